"""Recommended generation settings per SD3 family: one table, applied only when the user asks.

Source: Stability's reference inference script (``Stability-AI/sd3.5``, ``sd3_infer.py`` ``CONFIGS``),
whose samplers map onto A1111's labels (``dpmpp_2m`` -> "DPM++ 2M", ``euler`` -> "Euler") and whose
schedule (timesteps uniform from t(sigma_max) to t(sigma_min), then shifted) is A1111's "Uniform" on
SD3 with flow-correct samplers, but for its low end, which the reference shifts twice (docs/slg.md). SD3.5 Medium's CFG is the reference's ``skip_layer_config["cfg"]`` (4.0),
the value it uses when SLG is on, which the preset turns on.

``shift`` is recorded, not applied: A1111 builds the model's sampling with its own shift (3) and has no
field for it. The reference lists shift 1.0 for SD3 Medium, but the model's published scheduler config and
A1111 use 3.0; the table keeps 3.0 so that it describes what actually runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DEFAULT_FAMILY = "sd3-medium"
"""The family assumed when the loaded model does not say (A1111's SD3 without the SD3.5 loader)."""


@dataclasses.dataclass(frozen=True)
class Slg:
    layers: tuple[int, ...]
    scale: float
    start: float  # fraction of the steps, exclusive
    end: float


@dataclasses.dataclass(frozen=True)
class Preset:
    family: str
    steps: int
    cfg_scale: float
    sampler: str  # A1111 sampler label
    scheduler: str  # A1111 scheduler label
    shift: float  # recorded, not applied (see the module docstring)
    slg: Slg | None = None

    def txt2img_fields(self) -> dict[str, Any]:
        """The preset as ``/sdapi/v1/txt2img`` request fields, SLG as SD3 script args."""
        return {
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "sampler_name": self.sampler,
            "scheduler": self.scheduler,
            "alwayson_scripts": {"SD3": {"args": [self.script_args()]}},
        }

    def script_args(self) -> dict[str, Any]:
        """The SD3 script args the preset sets: SLG on with its values, or off."""
        if self.slg is None:
            return {"slg": "off"}
        return {"slg": "on", "slg_layers": list(self.slg.layers), "slg_scale": self.slg.scale,
                "slg_start": self.slg.start, "slg_end": self.slg.end}


PRESETS: dict[str, Preset] = {p.family: p for p in (
    Preset("sd3-medium", steps=50, cfg_scale=5.0, sampler="DPM++ 2M", scheduler="Uniform", shift=3.0),
    Preset("sd3.5-large", steps=40, cfg_scale=4.5, sampler="DPM++ 2M", scheduler="Uniform", shift=3.0),
    Preset("sd3.5-large-turbo", steps=4, cfg_scale=1.0, sampler="Euler", scheduler="Uniform", shift=3.0),
    Preset("sd3.5-medium", steps=50, cfg_scale=4.0, sampler="DPM++ 2M", scheduler="Uniform", shift=3.0,
           slg=Slg(layers=(7, 8, 9), scale=2.5, start=0.01, end=0.20)),
)}


def for_family(name: str | None) -> Preset:
    """The preset of a family name; a missing name means SD3 Medium, an unknown one is an error."""
    family = name or DEFAULT_FAMILY
    if family not in PRESETS:
        raise KeyError(f"no preset for SD3 family {family!r}; known: {', '.join(PRESETS)}")
    return PRESETS[family]


def as_dict(preset: Preset) -> dict[str, Any]:
    """One preset for the API: its values and the request fields that apply it."""
    return {**dataclasses.asdict(preset), "txt2img": preset.txt2img_fields()}
