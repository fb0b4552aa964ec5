"""The SD3 script's arguments: one ordered list shared by the UI and the API.

From the UI A1111 passes component values positionally; from the API users send
``"alwayson_scripts": {"SD3": {"args": [{"mixdq": "w8a8"}]}}`` -- one dict with named fields,
which survives us adding fields later. Positional lists are accepted too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

USE_SETTING = "setting"


@dataclasses.dataclass(frozen=True)
class ScriptArg:
    name: str
    label: str
    choices: tuple[str, ...]
    setting_key: str | None = None  # the setting that "setting" resolves to
    default: str = USE_SETTING


ARGS: tuple[ScriptArg, ...] = (
    ScriptArg("flow_samplers", "Flow-correct samplers", (USE_SETTING, "on", "off"), "sd3_flow_samplers"),
    ScriptArg("nan_guard", "NaN guard", (USE_SETTING, "on", "off"), "sd3_nan_guard"),
    ScriptArg("mixdq", "MixDQ quantization", (USE_SETTING, "off", "w8a8", "w4a8", "fp8"), "sd3_mixdq"),
)
NAMES = tuple(a.name for a in ARGS)


class ScriptArgError(ValueError):
    """Bad ``alwayson_scripts`` arguments; the message lists what is wrong and what is allowed."""


def parse(args: tuple | list) -> dict[str, str]:
    """Turn positional UI values or one API dict into ``{name: value}`` with defaults filled in."""
    if args and isinstance(args[0], dict):
        # A1111's API copies the request's args over the UI defaults: (our dict, default, default, ...).
        given = dict(args[0])
        unknown = sorted(set(given) - set(NAMES))
        if unknown:
            raise ScriptArgError(f"unknown SD3 script args {unknown}; known: {list(NAMES)}")
    else:
        if len(args) > len(ARGS):
            raise ScriptArgError(f"SD3 script takes at most {len(ARGS)} positional args {list(NAMES)}, got {len(args)}")
        given = dict(zip(NAMES, args, strict=False))
    values = {}
    for arg in ARGS:
        value = given.get(arg.name, arg.default)
        if isinstance(value, bool):  # API users naturally send true/false for on/off
            value = "on" if value else "off"
        value = USE_SETTING if value is None else str(value)
        if value not in arg.choices:
            raise ScriptArgError(f"SD3 script arg {arg.name}={value!r}; allowed: {list(arg.choices)}")
        values[arg.name] = value
    return values


def resolve(values: dict[str, str], setting: Any) -> dict[str, Any]:
    """Replace "setting" by the setting's current value; "on"/"off" become booleans for bool settings."""
    out: dict[str, Any] = {}
    for arg in ARGS:
        value = values[arg.name]
        if value == USE_SETTING and arg.setting_key:
            out[arg.name] = setting(arg.setting_key)
        elif set(arg.choices) == {USE_SETTING, "on", "off"}:
            out[arg.name] = value == "on"
        else:
            out[arg.name] = value
    return out
