"""Every ``SD3 ...`` infotext field, named once: what it records and what pasting it back restores.

Features write their entries with these names (``p.extra_generation_params[infotext.MIXDQ] = ...``);
``scripts/sd3.py`` hands :func:`paste_fields` to A1111 as the script's ``infotext_fields`` and
:data:`PASTED` as its ``paste_field_names``, so "Read generation parameters", "Send to img2img" and the
API's ``infotext`` request field put every image-changing choice back into the SD3 accordion.
No A1111 import here: the table is plain data and the readers take the parsed ``params`` dict.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

from lib_sd3.webui import script_args
from lib_sd3.webui.script_args import ScriptArgError, show

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


@dataclasses.dataclass(frozen=True)
class Field:
    label: str
    records: str
    restores: tuple[str, ...] = ()  # the accordion's script args a pasted infotext sets


FIELDS: tuple[Field, ...] = (
    Field(FLOW_SAMPLERS, "flow-correct samplers on or off (True / False)", ("flow_samplers",)),
    Field(NAN_GUARD, "NaN guard on or off (True / False)", ("nan_guard",)),
    Field(MIXDQ, "the MixDQ config the MMDiT ran with; absent: MixDQ off", ("mixdq",)),
    Field(MIXDQ_HASH, "sha256 of that config (a custom file's name alone is ambiguous)"),
    Field(SLG, "skip-layer guidance: layers, scale, step window; absent: SLG off",
          ("slg", "slg_layers", "slg_scale", "slg_start", "slg_end")),
    Field(T5, "T5 precision used, or why T5 was off; pasted back as the T5 setting (no accordion field)"),
    Field(FLOW_SAMPLER, "which flow form the chosen sampler ran as"),
    Field(FLOW_SCHEDULE, "which flow schedule the chosen scheduler gave"),
    Field(NAN_RECOVERY, "non-finite steps recomputed wider, and in what precision"),
    Field(SGM_NOISE, "A1111's SGM noise multiplier undone on SD3 (flow: pure noise has std 1)"),
    Field(T5_CUT, "early SD3 branch: how many T5 tokens dev's 77-per-CLIP-chunk rule kept"),
    Field(FAMILY, "the SD3 family the checkpoint was loaded as (the checkpoint itself pastes back as Model)"),
    Field(LORA_NOT_APPLIED, "prompt LoRAs that changed nothing (unreadable file, or no key fits the model)"),
)
LABELS = tuple(f.label for f in FIELDS)
PASTED = tuple(f.label for f in FIELDS if f.restores)
"""The labels A1111 copies between tabs ("Send to img2img") as the script's ``paste_field_names``."""

_SLG_TEXT = re.compile(r"layers\s+(?P<layers>[\d,\s]+?)\s*;\s*scale\s+(?P<scale>[-+\d.eE]+)\s*;"
                       r"\s*steps\s+(?P<start>[-+\d.eE]+)\s*-\s*(?P<end>[-+\d.eE]+)\s*$")


def format_slg(layers: Iterable[int], scale: float, start: float, end: float) -> str:
    """``layers 7,8,9; scale 2.5; steps 0.01-0.2`` (the window as fractions of the steps)."""
    return f"layers {show(tuple(layers))}; scale {scale:g}; steps {start:g}-{end:g}"


def parse_slg(text: Any) -> dict[str, Any] | None:
    """The script args a ``SD3 SLG`` entry names, checked like API args; None if it is not one of ours."""
    match = _SLG_TEXT.match(str(text).strip())
    if match is None:
        return None
    try:
        values = {"slg_layers": match["layers"], "slg_scale": match["scale"],
                  "slg_start": match["start"], "slg_end": match["end"]}
        return {name: script_args.BY_NAME[name].check(value) for name, value in values.items()}
    except ScriptArgError:
        return None


def _is_sd3(params: dict[str, Any]) -> bool:
    """An infotext written while our script ran on SD3: absent entries then mean "off"."""
    return any(str(key).startswith("SD3 ") for key in params)


def _switch(label: str) -> Callable[[dict[str, Any]], str | None]:
    def read(params: dict[str, Any]) -> str | None:
        value = str(params.get(label, "")).strip().lower()
        return {"true": "on", "on": "on", "false": "off", "off": "off"}.get(value)

    return read


def _mixdq(params: dict[str, Any]) -> str | None:
    value = params.get(MIXDQ)
    if value is None:
        return "off" if _is_sd3(params) else None
    return value if value in script_args.BY_NAME["mixdq"].choices else None  # a custom config: leave the field


def _slg(params: dict[str, Any]) -> str | None:
    if SLG in params:
        return "on" if parse_slg(params[SLG]) is not None else None
    return "off" if _is_sd3(params) else None


def _slg_part(name: str) -> Callable[[dict[str, Any]], Any]:
    def read(params: dict[str, Any]) -> Any:
        values = parse_slg(params[SLG]) if SLG in params else None
        if values is None:
            return None
        if name == "slg_layers":  # the accordion's multiselect holds a list of indices
            return [str(i) for i in values[name]]
        return values[name]

    return read


READERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "flow_samplers": _switch(FLOW_SAMPLERS),
    "nan_guard": _switch(NAN_GUARD),
    "mixdq": _mixdq,
    "slg": _slg,
    "slg_layers": _slg_part("slg_layers"),
    "slg_scale": _slg_part("slg_scale"),
    "slg_start": _slg_part("slg_start"),
    "slg_end": _slg_part("slg_end"),
}
"""Script arg -> its UI value read from a parsed infotext (None: leave the field as it is)."""


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


def _label_of(arg_name: str) -> str:
    return next(f.label for f in FIELDS if arg_name in f.restores)


def paste_fields(components: dict[str, Any]) -> list[tuple[Any, PasteKey]]:
    """``infotext_fields`` for the accordion: (component, key) for every script arg an infotext restores."""
    return [(components[name], PasteKey(_label_of(name), READERS[name])) for name in script_args.NAMES
            if name in components]


def pasted_values(params: dict[str, Any]) -> dict[str, Any]:
    """Script arg -> value a paste of ``params`` sets (the ones it leaves alone are left out)."""
    return {name: value for name, read in READERS.items() if (value := read(params)) is not None}
