"""Fake of the ControlNet extension's scripts/global_state.py (56cec5b)."""

from collections import OrderedDict
from pathlib import Path

from modules import shared
from scripts.enums import StableDiffusionVersion

cn_models = OrderedDict({"None": None})  # "name [hash]" -> path
cn_models_names = {}  # lower-case name -> "name [hash]"


def add_model(path, short_hash):
    """What update_cn_models does for one file found in models/ControlNet."""
    name = Path(path).stem
    cn_models[f"{name} [{short_hash}]"] = str(path)
    cn_models_names[name.lower()] = f"{name} [{short_hash}]"
    return f"{name} [{short_hash}]"


def get_sd_version():
    model = shared.sd_model
    if model.is_sdxl:
        return StableDiffusionVersion.SDXL
    if model.is_sd2:
        return StableDiffusionVersion.SD2x
    if model.is_sd1:
        return StableDiffusionVersion.SD1x
    return StableDiffusionVersion.UNKNOWN
