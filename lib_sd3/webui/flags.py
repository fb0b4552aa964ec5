"""The extension's command-line flags, declared once: ``preload.py`` adds them to A1111's parser, and
:func:`flag` reads them with their defaults, so a missing one is harmless.

No torch and no A1111 import here: A1111 calls ``preload`` early, while it builds its argument parser.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lib_sd3.t5 import MODES as T5_MODES


@dataclasses.dataclass(frozen=True)
class Flag:
    option: str  # as typed: --sd3-t5
    help: str
    default: Any = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # present or not (store_true)

    @property
    def name(self) -> str:
        """Where argparse puts it: ``shared.cmd_opts.sd3_t5``."""
        return self.option.lstrip("-").replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("--sd3-t5", "SD3: T5-XXL text encoder precision, or off (overrides the setting)", choices=T5_MODES),
    Flag("--sd3-no-fetch", "SD3: never download anything (T5, tokenizers); use what is on disk", False, switch=True),
    Flag("--sd3-mirror", "SD3: comma-separated Hugging Face endpoints to try in order, e.g. https://hf-mirror.com"),
    Flag("--sd3-mixdq", "SD3: quantize the MMDiT at load: off, a shipped MixDQ config (as in Settings > SD3) "
                        "or a path to a MixDQ YAML config"),
)
BY_NAME = {f.name: f for f in FLAGS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sd-webui-sd3")
    for f in FLAGS:
        if f.switch:
            group.add_argument(f.option, action="store_true", help=f.help)
        else:
            group.add_argument(f.option, choices=f.choices, default=f.default, help=f.help)


def flag(name: str) -> Any:
    try:
        from modules import shared

        return getattr(shared.cmd_opts, name, BY_NAME[name].default)
    except ImportError:
        return BY_NAME[name].default
