"""What A1111's early SD3 branch (34b4443c) lacks for img2img, inpainting and hires fix, added as dev has it.

Found by running those paths in the real early branch (tests/webui/test_real_early.py):

* ``SD3Inferencer.get_first_stage_encoding``: every img2img, inpainting and hires fix with a
  non-latent upscaler encodes its image with ``get_first_stage_encoding(encode_first_stage(image))``;
  the early class has no such method (HTTP 500). Dev's is the identity (``encode_first_stage``
  already applies the latent format's scale and shift); so is ours.

Each is detected by feature: where the class already has the method (dev) nothing is applied.
The early ``sample_img2img`` noises with ``x + sigma * noise`` and never calls an
``add_noise_to_latent``; the flow samplers (:mod:`lib_sd3.webui.samplers`) turn that start into
the flow latent ``(1 - s) x + s noise``, so no ``add_noise_to_latent`` is added here.
"""

from __future__ import annotations

from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import NotNeeded, Patch
from lib_sd3.webui.capabilities import a1111_module
from lib_sd3.webui.registry import REGISTRY

log = get_logger("early")

FEATURE = "img2img on the early SD3 branch"
MODEL_MODULE = "modules.models.sd3.sd3_model"


def inferencer_class() -> type | None:
    """A1111's SD3 model class (``SD3Inferencer``, in ``sd3_model.py`` on both states)."""
    module = a1111_module(MODEL_MODULE)
    return getattr(module, "SD3Inferencer", None) if module is not None else None


def missing_method(name: str) -> str | None:
    """The detector for adding ``SD3Inferencer.<name>``: None where it is missing (the early branch)."""
    cls = inferencer_class()
    if cls is None:
        return f"no SD3Inferencer in {MODEL_MODULE} (no SD3 support)"
    if hasattr(cls, name):
        return NotNeeded(f"not needed: SD3Inferencer has {name}")
    return None


def get_first_stage_encoding(_self: Any, x: Any) -> Any:
    """The identity, as dev's: SD3's ``encode_first_stage`` already returns the scaled, shifted latent."""
    return x


class MethodAddition:
    """Add a method a class lacks; undo removes exactly ours (``AttributeSwap`` needs an existing attribute)."""

    def __init__(self, name: str, function: Any) -> None:
        self.name, self.function = name, function
        self.owner: type | None = None

    def apply(self) -> None:
        self.owner = inferencer_class()
        setattr(self.owner, self.name, self.function)

    def undo(self) -> None:
        if self.owner is not None and vars(self.owner).get(self.name) is self.function:
            delattr(self.owner, self.name)
        self.owner = None


ADDED_METHODS: dict[str, Any] = {
    "get_first_stage_encoding": get_first_stage_encoding,
}
"""SD3Inferencer methods dev has and the early branch lacks, added where missing."""


def _patch(name: str, function: Any) -> Patch:
    addition = MethodAddition(name, function)
    return Patch(name=f"early.{name}", feature=FEATURE, detect=lambda: missing_method(name),
                 apply=addition.apply, undo=addition.undo)


PATCHES = tuple(REGISTRY.add(_patch(name, function)) for name, function in ADDED_METHODS.items())
