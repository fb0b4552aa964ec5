"""Command-line flags added by ``preload.py``; read here with defaults so a missing one is harmless."""

from __future__ import annotations

from typing import Any

FLAG_DEFAULTS: dict[str, Any] = {
    "sd3_t5": None,  # auto | fp16 | fp8 | off; overrides the setting when given
    "sd3_no_fetch": False,
    "sd3_mirror": None,  # comma-separated endpoints
    "sd3_mixdq": None,  # off | w8a8 | w4a8 | fp8 | path to a YAML config
}


def flag(name: str) -> Any:
    try:
        from modules import shared

        return getattr(shared.cmd_opts, name, FLAG_DEFAULTS[name])
    except ImportError:
        return FLAG_DEFAULTS[name]
