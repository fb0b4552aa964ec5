"""Every ``SD3 ...`` infotext field, named once: what it records.

Features write their entries with these names (``p.extra_generation_params[infotext.MIXDQ] = ...``);
which options an entry puts back when pasted ("Read generation parameters", "Send to img2img", the
API's ``infotext`` request field) is said by the options table (:mod:`lib_sd3.webui.options`), whose
rows name their entry and how to read it (``options.paste_fields`` hands them to A1111).
No A1111 import here: the table is plain data and the readers take the parsed ``params`` dict.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

FLOW_SAMPLERS = "SD3 flow samplers"
NAN_GUARD = "SD3 NaN guard"
MIXDQ = "SD3 MixDQ"
MIXDQ_HASH = "SD3 MixDQ hash"
SLG = "SD3 SLG"
T5 = "SD3 T5"
FLOW_SAMPLER = "SD3 flow sampler"
FLOW_SCHEDULE = "SD3 flow schedule"
NAN_RECOVERY = "SD3 NaN recovery"
FAMILY = "SD3 family"
SGM_NOISE = "SD3 SGM noise multiplier"
T5_CUT = "SD3 T5 cut"
LORA_NOT_APPLIED = "SD3 LoRA not applied"
CONTROLNET_UNITS = 3  # units in the SD3 accordion (and the API): "SD3 ControlNet 1" .. "SD3 ControlNet 3"


def controlnet(source: str) -> str:
    """A ControlNet unit's entry: ``SD3 ControlNet 1`` (the accordion's unit 1), ``SD3 ControlNet extension unit 1``."""
    return f"SD3 {source}"


@dataclasses.dataclass(frozen=True)
class Field:
    label: str
    records: str


FIELDS: tuple[Field, ...] = (
    Field(FLOW_SAMPLERS, "flow-correct samplers on or off (True / False)"),
    Field(NAN_GUARD, "NaN guard on or off (True / False)"),
    Field(MIXDQ, "the MixDQ config the MMDiT ran with; absent: MixDQ off"),
    Field(MIXDQ_HASH, "sha256 of that config (a custom file's name alone is ambiguous)"),
    Field(SLG, "skip-layer guidance: layers, scale, step window; absent: SLG off"),
    Field(T5, "T5 precision used, or why T5 was off; pasted back as the T5 setting (no accordion field)"),
    Field(FLOW_SAMPLER, "which flow form the chosen sampler ran as"),
    Field(FLOW_SCHEDULE, "which flow schedule the chosen scheduler gave"),
    Field(NAN_RECOVERY, "non-finite steps recomputed wider, and in what precision"),
    Field(SGM_NOISE, "A1111's SGM noise multiplier undone on SD3 (flow: pure noise has std 1)"),
    Field(T5_CUT, "early SD3 branch: how many T5 tokens dev's 77-per-CLIP-chunk rule kept"),
    Field(FAMILY, "the SD3 family the checkpoint was loaded as (the checkpoint itself pastes back as Model)"),
    Field(LORA_NOT_APPLIED, "prompt LoRAs that changed nothing (unreadable file, or no key fits the model)"),
    *(Field(controlnet(f"ControlNet {n}"), f"the accordion's ControlNet unit {n}: model [hash], type, preprocessor "
                                           "and its parameters, strength, step window, resize mode; or why it was off")
      for n in range(1, CONTROLNET_UNITS + 1)),
    Field(controlnet("ControlNet extension unit N"), "a unit of the ControlNet extension's panel that our ControlNet "
                                                     "ran (recorded only: the extension's own entry pastes it back)"),
)
LABELS = tuple(f.label for f in FIELDS)

_SLG_TEXT = re.compile(r"layers\s+(?P<layers>[\d,\s]+?)\s*;\s*scale\s+(?P<scale>[-+\d.eE]+)\s*;"
                       r"\s*steps\s+(?P<start>[-+\d.eE]+)\s*-\s*(?P<end>[-+\d.eE]+)\s*$")


def format_slg(layers: Iterable[int], scale: float, start: float, end: float) -> str:
    """``layers 7,8,9; scale 2.5; steps 0.01-0.2`` (the window as fractions of the steps)."""
    return f"layers {','.join(str(i) for i in layers)}; scale {scale:g}; steps {start:g}-{end:g}"


def split_slg(text: Any) -> dict[str, str] | None:
    """The words of a ``SD3 SLG`` entry by option name (unchecked); None if it is not one of ours."""
    match = _SLG_TEXT.match(str(text).strip())
    if match is None:
        return None
    return {"slg_layers": match["layers"], "slg_scale": match["scale"], "slg_start": match["start"],
            "slg_end": match["end"]}


CONTROLNET_WORDS = ("model", "type", "preprocessed by", "preprocessor", "canny low", "canny high", "blur radius",
                    "strength", "steps", "resize")
"""The parts of a ControlNet unit's entry, in the order written: ``model depth_v1 [0123456789]; type depth;
preprocessor none; strength 0.8; steps 0-0.6; resize Crop and resize``."""


def format_controlnet(words: dict[str, str]) -> str:
    return "; ".join(f"{key} {words[key]}" for key in CONTROLNET_WORDS if key in words)


def split_controlnet(text: Any) -> dict[str, str] | None:
    """The parts of a ControlNet unit's entry by word (unchecked); None if it is not one of ours (or says "off")."""
    words: dict[str, str] = {}
    for part in str(text).strip().split("; "):
        key = next((k for k in CONTROLNET_WORDS if part.startswith(k + " ")), None)
        if key is None or key in words:
            return None
        words[key] = part[len(key) + 1:].strip()
    return words if "model" in words else None


class PasteKey(str):
    """An infotext label that A1111 can also call to read a field's value.

    A1111 calls a callable key with the parsed params (``connect_paste``, the API's ``apply_infotext``),
    while ``paste_field_names`` and the list of fields that must not become "Override settings" compare
    keys with labels as strings. A ``str`` that is callable serves both.
    """

    read: Callable[[dict[str, Any]], Any]

    def __new__(cls, label: str, read: Callable[[dict[str, Any]], Any]) -> PasteKey:
        key = super().__new__(cls, label)
        key.read = read
        return key

    def __call__(self, params: dict[str, Any]) -> Any:
        return self.read(params)
