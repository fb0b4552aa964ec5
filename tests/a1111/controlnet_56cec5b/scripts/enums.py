"""Fake of the ControlNet extension's scripts/enums.py (56cec5b): the enums the bridge meets."""

from enum import Enum


class StableDiffusionVersion(Enum):
    UNKNOWN = 0
    SD1x = 1
    SD2x = 2
    SDXL = 3


class ResizeMode(Enum):
    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"


class ControlMode(Enum):
    BALANCED = "Balanced"
