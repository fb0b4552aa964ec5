"""The SD3 script's arguments as they arrive, checked and resolved through the one options table.

From the UI A1111 passes component values positionally; from the API users send
``"alwayson_scripts": {"SD3": {"args": [{"mixdq": "w8a8"}]}}`` -- one dict with named fields,
which survives us adding fields later. Positional lists are accepted too.

Every argument may be left to its setting: the UI shows that choice as ``default (on)`` (the setting's
value when the page was built); the API sends ``"setting"``, ``"default"``, null, or leaves the key out.
The options themselves (names, allowed values, settings) are :data:`lib_sd3.webui.options.OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.webui.options import (  # noqa: F401  (re-exported: the API's vocabulary)
    BY_NAME,
    MAX_LAYERS,
    NAMES,
    OPTIONS,
    USE_SETTING,
    Option,
    ScriptArgError,
    is_default_word,
    quote,
    show,
)

log = get_logger("options")

SCRIPT_TITLE = "SD3"
"""The script's title: the ``alwayson_scripts`` key A1111 matches case-insensitively."""

ARGS = OPTIONS
"""The script's arguments, in the order the UI passes them: the options table's rows."""


def known_names() -> str:
    """The args' names in one short line: the ControlNet units' fields once, as ``controlnet_<1-3>_{model,...}``."""
    units = [name for name in NAMES if name.startswith("controlnet_")]
    fields = [name.split("_", 2)[2] for name in units if name.startswith("controlnet_1_")]
    plain = ", ".join(name for name in NAMES if name not in units)
    return f"{plain}, controlnet_<1-{len(units) // max(len(fields), 1)}>_{{{','.join(fields)}}}" if units else plain


def parse(args: tuple | list) -> dict[str, Any]:
    """Turn positional UI values or one API dict into ``{name: value}`` with defaults filled in.

    A value is USE_SETTING or the argument's canonical form (a choice word, layers as a tuple, a float).
    """
    if args and isinstance(args[0], dict):
        # A1111's API copies the request's args over the UI defaults: (our dict, default, default, ...).
        given = dict(args[0])
        unknown = sorted(map(str, set(given) - set(NAMES)))
        if unknown:
            raise ScriptArgError(f"unknown SD3 script args {quote(unknown)}; known: {known_names()}")
    else:
        if len(args) > len(ARGS):
            raise ScriptArgError(f"SD3 script takes at most {len(ARGS)} positional args ({known_names()}), got {len(args)}")
        given = dict(zip(NAMES, args, strict=False))
    return {arg.name: arg.check(given.get(arg.name)) for arg in ARGS}


def resolve(values: dict[str, Any], setting: Callable[[str], Any], lenient: bool = False) -> dict[str, Any]:
    """Replace USE_SETTING by the setting's current value; "on"/"off" become booleans.

    A setting holding a value not allowed here (an override pasted from another install's infotext in the
    UI) raises ScriptArgError, or with ``lenient`` costs one warning line and the option's default.
    """
    out: dict[str, Any] = {}
    for arg in ARGS:
        try:
            out[arg.name] = arg.resolve(values[arg.name], setting)
        except ScriptArgError as error:
            if not lenient:
                raise
            log.warning("%s; using %s", error, show(arg.setting_default))
            out[arg.name] = arg.from_setting(arg.setting_default)
    return out


def check_window(values: dict[str, Any]) -> None:
    start, end = values["slg_start"], values["slg_end"]  # the UI's sliders may cross: that window is just empty
    if USE_SETTING not in (start, end) and start >= end:
        raise ScriptArgError(f"SD3 script args slg_start={start:g} >= slg_end={end:g}; allowed: slg_start < slg_end")


def check_request(entry: Any) -> dict[str, Any]:
    """An API request's ``alwayson_scripts["SD3"]`` entry, checked before any generation starts.

    A1111 itself fails on ``null`` (HTTP 500) and silently ignores a list in place of ``{"args": ...}``, other
    keys, and elements after the dict: all of them are answered here, in one line.
    """
    if not isinstance(entry, dict):
        raise ScriptArgError(f"alwayson_scripts {SCRIPT_TITLE} must be {{\"args\": [{{\"name\": value, ...}}]}}; "
                             f"got {quote(entry)}")
    unknown = sorted(map(str, set(entry) - {"args"}))
    if unknown:
        raise ScriptArgError(f"alwayson_scripts {SCRIPT_TITLE} takes only \"args\"; got {quote(unknown)}")
    args = entry.get("args", [])
    if not isinstance(args, (list, tuple)):  # A1111 indexes args by position: anything else fails inside it
        raise ScriptArgError(f"SD3 script args must be a list: [{{\"name\": value, ...}}] or values in the order "
                             f"{known_names()}; got {quote(args)}")
    if args and isinstance(args[0], dict) and len(args) > 1:
        raise ScriptArgError(f"SD3 script args: one dict and nothing after it; got {len(args)} elements, "
                             f"the second {quote(args[1])}")
    values = parse(tuple(args))
    check_window(values)
    return values
