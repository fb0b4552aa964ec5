"""Fake of the ControlNet extension's internal_controlnet/args.py (56cec5b): ``ControlNetUnit``, the fields
the bridge reads (the real one is a pydantic model; its validators reset out-of-range slider values)."""

import dataclasses
from typing import Any

from scripts.enums import ControlMode, ResizeMode


@dataclasses.dataclass
class ControlNetUnit:
    enabled: bool = False
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None  # np.ndarray, or {"image": ..., "mask": ...} from the panel
    resize_mode: ResizeMode = ResizeMode.INNER_FIT
    low_vram: bool = False
    processor_res: int = 512
    threshold_a: float = 100.0
    threshold_b: float = 200.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: ControlMode = ControlMode.BALANCED

    def __post_init__(self):
        if isinstance(self.resize_mode, str):
            self.resize_mode = ResizeMode(self.resize_mode)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)

    def serialize(self):
        return (f"Module: {self.module}, Model: {self.model}, Weight: {self.weight}, "
                f"Resize Mode: {self.resize_mode.value}, Guidance Start: {self.guidance_start}, "
                f"Guidance End: {self.guidance_end}")
