"""The fake ``shared.sd_model``: one class for every family, SD3 included."""

from __future__ import annotations

from typing import Any

FAMILY_FLAGS = {"SD1": "is_sd1", "SD2": "is_sd2", "SDXL": "is_sdxl", "SSD": "is_ssd", "SD3": "is_sd3"}
"""Family -> the flag ``sd_models.set_model_type`` sets (all five exist on both states)."""


class BaseModel:
    """``sd_model.model`` (SD3: ``sd3_impls.BaseModel``; SD1.5 / SDXL: the LDM wrapper): holds ``diffusion_model``."""

    def __init__(self, diffusion_model: Any) -> None:
        self.diffusion_model = diffusion_model


class Model:
    """``shared.sd_model`` with A1111's family flags; ``attrs`` adds what a test's code path reads.

    ``first_stage=False`` is the early SD3 branch's SD3Inferencer: ``encode_first_stage`` but no
    ``get_first_stage_encoding`` (dev has both). ``diffusion_model``: the MMDiT (or UNet) at
    ``sd_model.model.diffusion_model``, where A1111 keeps it.
    """

    def __init__(self, family: str = "SD3", first_stage: bool = True, diffusion_model: Any = None,
                 **attrs: Any) -> None:
        if diffusion_model is not None:
            self.model = BaseModel(diffusion_model)
        for flag in FAMILY_FLAGS.values():
            setattr(self, flag, False)
        setattr(self, FAMILY_FLAGS[family], True)
        self.family = family
        self.encode_first_stage = lambda image: ("latent", image)
        if first_stage:
            self.get_first_stage_encoding = lambda latent: latent
        for key, value in attrs.items():
            setattr(self, key, value)
