"""A ControlNet unit as asked for, from wherever it comes: the SD3 accordion, the API or the ControlNet
extension's panel. :mod:`lib_sd3.webui.controlnet` turns the requests of a generation into
:class:`lib_sd3.controlnet.control.ControlUnit` s (file found and loaded, map made, VAE-encoded)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_sd3.controlnet.detect import ControlType
from lib_sd3.controlnet.preprocess import ResizeMode


@dataclasses.dataclass(frozen=True)
class UnitRequest:
    source: str  # where it was asked, for messages and the infotext: "SD3 unit 1", "ControlNet extension unit 1"
    model: str  # as the user named it: file name, name without extension, or short hash
    image: Any = None  # PIL image; None: img2img's init image (the blur ControlNet's upscaling recipe)
    preprocessor: str = "none"  # applied by us: a key of lib_sd3.controlnet.preprocess.PREPROCESSORS
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the preprocessor's parameters (canny: low, high; blur: radius)
    control_type: ControlType | None = None  # None: the file's own control_type
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resize_mode: ResizeMode = ResizeMode.JUST_RESIZE
    path: Path | None = None  # the file, when the source found it itself (the extension's model list)
    preprocessed_by: str | None = None  # the preprocessor that already ran elsewhere (the extension's), for the infotext
