"""Every per-image SD3 option, declared once: the one table the rest is derived from.

A row says everything about one option: its API key (``alwayson_scripts`` args), the setting that
decides it by default (key, default, label), its allowed values and how a free value is read, the
accordion control (label, row, dropdown / slider / multiselect), the infotext entry that records it
and how a pasted infotext puts it back, and what a preset sets it to. :mod:`script_args` (API and UI
values), :mod:`settings` (the settings page), the script's accordion rows, the paste-back fields and
:mod:`presets` (the preset button) are all built from :data:`OPTIONS`: a new option is one row here
plus the feature that reads it from ``p.sd3.options`` (:mod:`lib_sd3.webui.generation`).

No A1111 import here: the table is plain data.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lib_sd3.controlnet.detect import ControlType
from lib_sd3.controlnet.preprocess import BLUR_RADIUS, CANNY_HIGH, CANNY_LOW, PREPROCESSORS, ResizeMode
from lib_sd3.mixdq.config import SHIPPED as MIXDQ_SHIPPED
from lib_sd3.webui import infotext

USE_SETTING = "setting"
"""The canonical "the setting decides" value (what the API has always accepted)."""

ON_OFF = ("on", "off")
MIXDQ_CHOICES = ("off", *MIXDQ_SHIPPED)
"""The MixDQ words of the accordion, the API and the setting (a ``--sd3-mixdq PATH`` config replaces what
"w8a8" means, not the words)."""

MAX_LAYERS = 38
"""Joint blocks the accordion offers for SLG before a model is loaded: SD3.5 Large's depth, the deepest."""

QUOTE_CHARS = 80
"""A bad value is quoted in an error line up to this many characters (a request may send megabytes)."""


class ScriptArgError(ValueError):
    """A bad SD3 option value (API args, an override setting); the message names it and what is allowed."""


def quote(value: Any) -> str:
    """``repr(value)`` cut to :data:`QUOTE_CHARS`, so one bad value stays one short line."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


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
    except (TypeError, ValueError, OverflowError):
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
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"a number from {low:g} to {high:g}") from None
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"a number from {low:g} to {high:g}")
        return number

    read.__doc__ = f"A number in [{low:g}, {high:g}]."
    return read


NO_MODEL = "None"
"""A ControlNet unit's model when the unit is off (the ControlNet extension's word for it)."""

CONTROL_TYPES = ("auto", *(t.label for t in ControlType))
"""auto: the file's own ``control_type``."""


def read_model_name(value: Any) -> str:
    """A ControlNet by file name, name without extension, ``name [hash]`` or short hash; "None": no unit."""
    if not isinstance(value, str):
        raise ValueError("a ControlNet name or hash (GET /sd3/controlnet lists them), or \"None\"")
    name = value.strip()
    return NO_MODEL if name.lower() in ("", "none") else name


def read_image(value: Any) -> Image.Image | None:
    """A control image: base64 (PNG / JPEG / WebP, with or without a ``data:`` prefix) from the API, a PIL
    image or an array from the UI; None: no image (img2img then uses its init image)."""
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    if isinstance(value, dict) and "image" in value:  # gradio's image-with-mask dict
        return read_image(value["image"])
    allowed = "an image as base64 (PNG, JPEG or WebP)"
    if not isinstance(value, str):
        raise ValueError(allowed)
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError):
        raise ValueError(allowed) from None
    return image


def show(value: Any) -> str:
    """A value as the UI and the infotext write it (booleans as on/off, layers as 7,8,9)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def is_default_word(value: str) -> bool:
    """"setting" (the API's word), "" and "default" / "default (on)" (the UI's) all mean: the setting decides."""
    word = value.strip()
    return word in ("", USE_SETTING) or word == "default" or (word.startswith("default (") and word.endswith(")"))


# --- paste-back: a parsed infotext -> the accordion's value (None: leave the field as it is) ----------

def _is_sd3(params: dict[str, Any]) -> bool:
    """An infotext written while our script ran on SD3: absent entries then mean "off"."""
    return any(str(key).startswith("SD3 ") for key in params)


def _paste_switch(label: str) -> Callable[[dict[str, Any]], str | None]:
    def read(params: dict[str, Any]) -> str | None:
        value = str(params.get(label, "")).strip().lower()
        return {"true": "on", "on": "on", "false": "off", "off": "off"}.get(value)

    return read


def _paste_mixdq(params: dict[str, Any]) -> str | None:
    value = params.get(infotext.MIXDQ)
    if value is None:
        return "off" if _is_sd3(params) else None
    return value if value in MIXDQ_CHOICES else None  # a custom config: leave the field


def parse_slg(text: Any) -> dict[str, Any] | None:
    """The options a ``SD3 SLG`` entry names, checked like API args; None if it is not one of ours."""
    words = infotext.split_slg(text)
    if words is None:
        return None
    try:
        return {name: BY_NAME[name].check(value) for name, value in words.items()}
    except ScriptArgError:
        return None


def _paste_slg(params: dict[str, Any]) -> str | None:
    if infotext.SLG in params:
        return "on" if parse_slg(params[infotext.SLG]) is not None else None
    return "off" if _is_sd3(params) else None


def _paste_slg_part(name: str) -> Callable[[dict[str, Any]], Any]:
    def read(params: dict[str, Any]) -> Any:
        values = parse_slg(params[infotext.SLG]) if infotext.SLG in params else None
        if values is None:
            return None
        if name == "slg_layers":  # the accordion's multiselect holds a list of indices
            return [str(i) for i in values[name]]
        return values[name]

    return read


def _preset_slg(field: str) -> Callable[[Any], Any]:
    """What a preset sets an SLG option to: on/off, or its SLG value; None (a family without SLG): the
    switch says off and the values are cleared back to "the setting decides"."""
    def value(preset: Any) -> Any:
        slg = preset.slg
        if field == "slg":
            return "on" if slg else "off"
        if slg is None:
            return [] if field == "layers" else None
        return [str(i) for i in slg.layers] if field == "layers" else getattr(slg, field)

    return value


def _paste_controlnet(n: int, field: str) -> Callable[[dict[str, Any]], Any]:
    """One field of the accordion's unit ``n`` from its ``SD3 ControlNet n`` entry. With no entry in an SD3
    infotext the unit was off: the model says so; the image is never pasted."""
    label = infotext.controlnet(f"ControlNet {n}")

    def read(params: dict[str, Any]) -> Any:
        words = infotext.split_controlnet(params[label]) if label in params else None
        if words is None:
            return NO_MODEL if field == "model" and _is_sd3(params) else None
        if field == "model":
            return re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", words["model"])
        if field in ("start", "end"):
            window = words.get("steps", "").split("-")
            value = window[0 if field == "start" else 1] if len(window) == 2 else None
        else:
            value = words.get(CONTROLNET_PASTE_WORDS[field])
        if value is None:
            return None
        try:
            return BY_NAME[f"controlnet_{n}_{field}"].check(value)
        except ScriptArgError:
            return None

    return read


CONTROLNET_PASTE_WORDS = {"type": "type", "preprocessor": "preprocessor", "strength": "strength",
                          "resize_mode": "resize", "canny_low": "canny low", "canny_high": "canny high",
                          "blur_radius": "blur radius"}
"""Accordion field -> the word of its part in a unit's infotext entry."""


def controlnet_unit(n: int) -> tuple[Option, ...]:
    """The rows of the accordion's ControlNet unit ``n`` (API keys ``controlnet_<n>_model`` ...). No setting
    decides them: a unit is off until a model is picked."""
    def row(field: str, label: str, default: Any, **kwargs: Any) -> Option:
        paste = None if field == "image" else _paste_controlnet(n, field)
        return Option(f"controlnet_{n}_{field}", label, None, default, "", row=None,
                      infotext=infotext.controlnet(f"ControlNet {n}") if paste else None, paste=paste, **kwargs)

    def number(field: str, label: str, default: float, slider: tuple[float, float, float]) -> Option:
        return row(field, label, default, read=read_number(slider[0], slider[1]), slider=slider)

    return (
        row("model", "Model", NO_MODEL, read=read_model_name),
        row("image", "Control image", None, read=read_image),
        row("type", "Type", "auto", choices=CONTROL_TYPES),
        row("preprocessor", "Preprocessor", "none", choices=tuple(PREPROCESSORS)),
        number("strength", "Strength", 1.0, (0.0, 2.0, 0.05)),
        number("start", "Start (fraction of steps)", 0.0, (0.0, 1.0, 0.01)),
        number("end", "End (fraction of steps)", 1.0, (0.0, 1.0, 0.01)),
        row("resize_mode", "Resize mode", ResizeMode.JUST_RESIZE.value, choices=tuple(m.value for m in ResizeMode)),
        number("canny_low", "Canny low threshold", float(CANNY_LOW), (0.0, 255.0, 1.0)),
        number("canny_high", "Canny high threshold", float(CANNY_HIGH), (0.0, 255.0, 1.0)),
        number("blur_radius", "Blur radius (px)", BLUR_RADIUS, (0.0, 64.0, 0.5)),
    )


# --- the table -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the API's key, and the accordion field's elem_id (sd3_<name>_<tab>)
    label: str  # the accordion's label
    setting_key: str | None  # what "default" / "setting" resolves to; None: no setting, always ``setting_default``
    setting_default: Any
    setting_label: str  # the settings page's label
    choices: tuple[str, ...] | None = None  # fixed words; None: a free value checked by ``read``
    read: Callable[[Any], Any] | None = None  # free value -> typed value; ValueError says what is allowed
    slider: tuple[float, float, float] | None = None  # (minimum, maximum, step) of a number
    row: int | None = 0  # the accordion row it sits in; None: a feature builds its field (ControlNet units)
    infotext: str | None = None  # the infotext entry that records it (lib_sd3.webui.infotext)
    paste: Callable[[dict[str, Any]], Any] | None = None  # parsed infotext -> accordion value (None: leave)
    preset: Callable[[Any], Any] | None = None  # a preset -> the value it sets (None: clear); absent: untouched
    comment: str = ""  # the settings page's note

    @property
    def default(self) -> str:
        """The argument's own default: the setting decides."""
        return USE_SETTING

    @property
    def is_switch(self) -> bool:
        return self.choices == ON_OFF

    @property
    def setting_choices(self) -> tuple[str, ...] | None:
        """A switch is a checkbox setting (a bool); other words are a radio of the same words."""
        return None if self.choices is None or self.is_switch else self.choices

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
                raise ScriptArgError(f"SD3 script arg {self.name}={quote(value)}; allowed: "
                                     f"{[USE_SETTING, *self.choices]}")
            return value
        try:
            return self.read(value)
        except ValueError as error:
            raise ScriptArgError(f"SD3 script arg {self.name}={quote(value)}; allowed: {error} or "
                                 f"{USE_SETTING!r}") from None

    def from_setting(self, setting_value: Any) -> Any:
        """The setting's value in this option's resolved form (a bool for a switch); ScriptArgError if it is
        not an allowed value (an override setting or a pasted infotext from another install)."""
        if self.is_switch:
            if isinstance(setting_value, bool):
                return setting_value
            allowed: Any = "true or false"
        elif self.choices is not None:
            if setting_value in self.choices:
                return setting_value
            allowed = list(self.choices)
        else:
            try:
                return self.read(setting_value)
            except ValueError as error:
                allowed = error
        raise ScriptArgError(f"SD3 setting {self.setting_key}={quote(setting_value)}; allowed: {allowed}")

    def resolve(self, value: Any, setting: Callable[[str], Any]) -> Any:
        """A checked value (:meth:`check`) -> what the generation runs with."""
        if value is USE_SETTING or (isinstance(value, str) and value == USE_SETTING):
            return self.from_setting(setting(self.setting_key) if self.setting_key else self.setting_default)
        return value == "on" if self.is_switch else value


def _number(name: str, label: str, setting_key: str, setting_default: float, setting_label: str,
            slider: tuple[float, float, float], **kwargs: Any) -> Option:
    return Option(name, label, setting_key, setting_default, setting_label, read=read_number(slider[0], slider[1]),
                  slider=slider, **kwargs)


OPTIONS: tuple[Option, ...] = (
    Option("flow_samplers", "Flow-correct samplers", "sd3_flow_samplers", True,
           "Use flow-correct samplers and schedules for SD3", ON_OFF, row=0,
           infotext=infotext.FLOW_SAMPLERS, paste=_paste_switch(infotext.FLOW_SAMPLERS)),
    Option("nan_guard", "NaN guard", "sd3_nan_guard", True,
           "NaN guard: recompute a non-finite step at higher precision", ON_OFF, row=0,
           infotext=infotext.NAN_GUARD, paste=_paste_switch(infotext.NAN_GUARD)),
    Option("mixdq", "MixDQ quantization", "sd3_mixdq", "off", "MixDQ quantization of the SD3 MMDiT",
           MIXDQ_CHOICES, row=0, infotext=infotext.MIXDQ, paste=_paste_mixdq),
    Option("slg", "Skip-layer guidance", "sd3_slg", False,
           "Skip-layer guidance (SLG): one more cond pass with some joint blocks skipped", ON_OFF, row=1,
           infotext=infotext.SLG, paste=_paste_slg, preset=_preset_slg("slg"),
           comment="Stability recommends it for SD3.5 Medium; off unless turned on here, in the accordion or "
                   "by a preset"),
    Option("slg_layers", "SLG layers (joint blocks)", "sd3_slg_layers", "7,8,9",
           "SLG: joint blocks to skip (comma-separated indices)", read=read_layers, row=1,
           infotext=infotext.SLG, paste=_paste_slg_part("slg_layers"), preset=_preset_slg("layers")),
    _number("slg_scale", "SLG scale", "sd3_slg_scale", 2.5, "SLG: scale", (0.0, 20.0, 0.1), row=1,
            infotext=infotext.SLG, paste=_paste_slg_part("slg_scale"), preset=_preset_slg("scale")),
    _number("slg_start", "SLG start (fraction of steps)", "sd3_slg_start", 0.01,
            "SLG: first step, as a fraction of the steps (exclusive)", (0.0, 1.0, 0.01), row=1,
            infotext=infotext.SLG, paste=_paste_slg_part("slg_start"), preset=_preset_slg("start")),
    _number("slg_end", "SLG end (fraction of steps)", "sd3_slg_end", 0.20,
            "SLG: last step, as a fraction of the steps (exclusive)", (0.0, 1.0, 0.01), row=1,
            infotext=infotext.SLG, paste=_paste_slg_part("slg_end"), preset=_preset_slg("end")),
    *(option for n in range(1, infotext.CONTROLNET_UNITS + 1) for option in controlnet_unit(n)),
)
NAMES = tuple(o.name for o in OPTIONS)
BY_NAME = {o.name: o for o in OPTIONS}
BY_SETTING = {o.setting_key: o for o in OPTIONS if o.setting_key}
ROWS = tuple(tuple(o.name for o in OPTIONS if o.row == row)
             for row in sorted({o.row for o in OPTIONS if o.row is not None}))
"""The accordion's rows of fields, in table order."""
PASTED = tuple(dict.fromkeys(o.infotext for o in OPTIONS if o.paste is not None))
"""The infotext labels A1111 copies between tabs ("Send to img2img") as the script's ``paste_field_names``."""
PRESET_SET = tuple(o.name for o in OPTIONS if o.preset is not None)
"""The options the preset button sets."""


def setting_infotext(option: Option) -> str | None:
    """The infotext label of the option's setting: an entry recording this option alone holds the setting's
    value (A1111 may paste it as "Override settings"); SLG's one entry describes five options."""
    if option.infotext is None or sum(o.infotext == option.infotext for o in OPTIONS) > 1:
        return None
    return option.infotext


def pasted_values(params: dict[str, Any]) -> dict[str, Any]:
    """Option -> value a paste of ``params`` sets (the ones it leaves alone are left out)."""
    return {o.name: value for o in OPTIONS if o.paste is not None and (value := o.paste(params)) is not None}


def paste_fields(components: dict[str, Any]) -> list[tuple[Any, infotext.PasteKey]]:
    """The script's ``infotext_fields``: (component, key) for every accordion field an infotext restores."""
    return [(components[o.name], infotext.PasteKey(o.infotext, o.paste)) for o in OPTIONS
            if o.paste is not None and o.name in components]


def preset_values(preset: Any) -> dict[str, Any]:
    """Option -> value the preset button writes into the accordion (None: leave the field as it is)."""
    return {o.name: o.preset(preset) for o in OPTIONS if o.preset is not None}
