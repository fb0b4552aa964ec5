"""The SD3 script's arguments: one ordered list shared by the UI, the API and the infotext.

From the UI A1111 passes component values positionally; from the API users send
``"alwayson_scripts": {"SD3": {"args": [{"mixdq": "w8a8"}]}}`` -- one dict with named fields,
which survives us adding fields later. Positional lists are accepted too.

Every argument may be left to its setting: the UI shows that choice as ``default (on)`` (the setting's
value when the page was built); the API sends ``"setting"``, ``"default"``, null, or leaves the key out.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

SCRIPT_TITLE = "SD3"
"""The script's title: the ``alwayson_scripts`` key A1111 matches case-insensitively."""

USE_SETTING = "setting"
"""The canonical "the setting decides" value (what the API has always accepted)."""

ON_OFF = ("on", "off")


class ScriptArgError(ValueError):
    """Bad ``alwayson_scripts`` arguments; the message lists what is wrong and what is allowed."""


def read_layers(value: Any) -> tuple[int, ...]:
    """Joint-block indices from ``"7,8,9"``, ``"7 8 9"`` or ``[7, 8, 9]``: at least one, each >= 0."""
    if isinstance(value, str):
        words = [w for w in re.split(r"[\s,]+", value.strip()) if w]
    elif isinstance(value, (list, tuple)):
        words = list(value)
    else:
        raise ValueError("a list of joint-block indices such as \"7,8,9\"")
    try:
        if any(isinstance(w, bool) or (isinstance(w, float) and not w.is_integer()) for w in words):
            raise ValueError
        layers = tuple(sorted({int(w) for w in words}))
    except (TypeError, ValueError):
        raise ValueError("a list of joint-block indices such as \"7,8,9\"") from None
    if not layers or layers[0] < 0:
        raise ValueError("a non-empty list of joint-block indices >= 0 such as \"7,8,9\"")
    return layers


def read_number(low: float, high: float) -> Callable[[Any], float]:
    def read(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"a number from {low:g} to {high:g}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"a number from {low:g} to {high:g}") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"a number from {low:g} to {high:g}")
        return number

    read.__doc__ = f"A number in [{low:g}, {high:g}]."
    return read


def show(value: Any) -> str:
    """A value as the UI and the infotext write it (booleans as on/off, layers as 7,8,9)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class ScriptArg:
    name: str
    label: str
    setting_key: str  # what "default" / "setting" resolves to
    choices: tuple[str, ...] | None = None  # fixed words; None: a free value checked by ``read``
    read: Callable[[Any], Any] | None = None  # free value -> typed value; ValueError says what is allowed
    slider: tuple[float, float, float] | None = None  # (minimum, maximum, step) of a number

    @property
    def default(self) -> str:
        return USE_SETTING

    @property
    def is_switch(self) -> bool:
        return self.choices == ON_OFF

    def default_label(self, setting_value: Any) -> str:
        """What the UI shows for "the setting decides": ``default (on)``."""
        return f"default ({show(setting_value)})"

    def check(self, value: Any) -> Any:
        """One given value -> USE_SETTING or its canonical form; ScriptArgError names key and what is allowed."""
        if value is None or (isinstance(value, str) and is_default_word(value)) or (
                isinstance(value, (list, tuple)) and not value):  # the UI's empty multiselect
            return USE_SETTING
        if self.choices is not None:
            if isinstance(value, bool) and self.is_switch:  # API users naturally send true/false for on/off
                value = "on" if value else "off"
            if not isinstance(value, str) or value not in self.choices:
                raise ScriptArgError(f"SD3 script arg {self.name}={value!r}; allowed: "
                                     f"{[USE_SETTING, *self.choices]}")
            return value
        try:
            return self.read(value)
        except ValueError as error:
            raise ScriptArgError(f"SD3 script arg {self.name}={value!r}; allowed: {error} or {USE_SETTING!r}") from None

    def from_setting(self, setting_value: Any) -> Any:
        if self.read is None:
            return setting_value
        try:
            return self.read(setting_value)
        except ValueError as error:
            raise ScriptArgError(f"SD3 setting {self.setting_key}={setting_value!r}; allowed: {error}") from None


def is_default_word(value: str) -> bool:
    """"setting" (the API's word), "" and "default" / "default (on)" (the UI's) all mean: the setting decides."""
    word = value.strip()
    return word in ("", USE_SETTING) or word == "default" or (word.startswith("default (") and word.endswith(")"))


def number_arg(name: str, label: str, setting_key: str, slider: tuple[float, float, float]) -> ScriptArg:
    return ScriptArg(name, label, setting_key, read=read_number(slider[0], slider[1]), slider=slider)


MAX_LAYERS = 38
"""Joint blocks the accordion offers for SLG: SD3.5 Large's depth, the deepest SD3 family."""

ARGS: tuple[ScriptArg, ...] = (
    ScriptArg("flow_samplers", "Flow-correct samplers", "sd3_flow_samplers", ON_OFF),
    ScriptArg("nan_guard", "NaN guard", "sd3_nan_guard", ON_OFF),
    ScriptArg("mixdq", "MixDQ quantization", "sd3_mixdq", ("off", "w8a8", "w4a8", "fp8")),
    ScriptArg("slg", "Skip-layer guidance", "sd3_slg", ON_OFF),
    ScriptArg("slg_layers", "SLG layers (joint blocks)", "sd3_slg_layers", read=read_layers),
    number_arg("slg_scale", "SLG scale", "sd3_slg_scale", (0.0, 20.0, 0.1)),
    number_arg("slg_start", "SLG start (fraction of steps)", "sd3_slg_start", (0.0, 1.0, 0.01)),
    number_arg("slg_end", "SLG end (fraction of steps)", "sd3_slg_end", (0.0, 1.0, 0.01)),
)
NAMES = tuple(a.name for a in ARGS)
BY_NAME = {a.name: a for a in ARGS}


def parse(args: tuple | list) -> dict[str, Any]:
    """Turn positional UI values or one API dict into ``{name: value}`` with defaults filled in.

    A value is USE_SETTING or the argument's canonical form (a choice word, layers as a tuple, a float).
    """
    if args and isinstance(args[0], dict):
        # A1111's API copies the request's args over the UI defaults: (our dict, default, default, ...).
        given = dict(args[0])
        unknown = sorted(map(str, set(given) - set(NAMES)))
        if unknown:
            raise ScriptArgError(f"unknown SD3 script args {unknown}; known: {list(NAMES)}")
    else:
        if len(args) > len(ARGS):
            raise ScriptArgError(f"SD3 script takes at most {len(ARGS)} positional args {list(NAMES)}, got {len(args)}")
        given = dict(zip(NAMES, args, strict=False))
    return {arg.name: arg.check(given.get(arg.name)) for arg in ARGS}


def resolve(values: dict[str, Any], setting: Any) -> dict[str, Any]:
    """Replace USE_SETTING by the setting's current value; "on"/"off" become booleans."""
    out: dict[str, Any] = {}
    for arg in ARGS:
        value = values[arg.name]
        if value == USE_SETTING:
            out[arg.name] = arg.from_setting(setting(arg.setting_key))
        elif arg.is_switch:
            out[arg.name] = value == "on"
        else:
            out[arg.name] = value
    return out


def check_request(args: Any) -> dict[str, Any]:
    """The ``args`` of an API request's ``alwayson_scripts["SD3"]``, checked before any generation starts."""
    if not isinstance(args, (list, tuple)):  # A1111 indexes args by position: a bare dict would fail inside it
        raise ScriptArgError(f"SD3 script args must be a list: [{{\"name\": value, ...}}] or values in the order "
                             f"{list(NAMES)}; got a {type(args).__name__}")
    values = parse(tuple(args))
    start, end = values["slg_start"], values["slg_end"]  # the UI's sliders may cross: that window is just empty
    if USE_SETTING not in (start, end) and start >= end:
        raise ScriptArgError(f"SD3 script args slg_start={start:g} >= slg_end={end:g}; allowed: slg_start < slg_end")
    return values
