"""What A1111's early SD3 branch (34b4443c) lacks for img2img, inpainting and hires fix, added as dev has it.

Found by running those paths in the real early branch (tests/webui/test_real_early.py):

* ``SD3Inferencer.get_first_stage_encoding``: every img2img, inpainting and hires fix with a
  non-latent upscaler encodes its image with ``get_first_stage_encoding(encode_first_stage(image))``;
  the early class has no such method (HTTP 500). Dev's is the identity (``encode_first_stage``
  already applies the latent format's scale and shift); so is ours.
* ``SD3Inferencer.dtype``: the early img2img ``init`` casts the inpainting mask to ``sd_model.dtype``
  (HTTP 500 with a mask); dev casts it to ``devices.dtype``, which ours returns.
* the latent inpainting mask: the early ``init`` tiles it to 4 channels, SD3's latent has 16 (HTTP 500
  in every inpainting); :func:`mask_to_latent_channels` tiles it to the model's ``latent_channels`` as dev does.
* sizes that are not multiples of 16 (SD3's 2x2 latent patches): dev rounds them down in
  ``process_images_inner`` (``fix_dimensions``); the early branch does not, so ours does.

Each is detected by feature: where the class already has the method (dev) nothing is applied.
The early ``sample_img2img`` noises with ``x + sigma * noise`` and never calls an
``add_noise_to_latent``; the flow samplers (:mod:`lib_sd3.webui.samplers`) turn that start into
the flow latent ``(1 - s) x + s noise``, so no ``add_noise_to_latent`` is added here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeAddition, AttributeSwap, ConvertOnSet, NotNeeded, Patch
from lib_sd3.webui import hooks
from lib_sd3.webui.capabilities import a1111_module

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


def reads_model_dtype() -> str | None:
    """The detector for ``SD3Inferencer.dtype``: None where A1111's img2img ``init`` reads ``sd_model.dtype``
    (the early branch, for the inpainting mask) and the SD3 class has none; dev reads ``devices.dtype``."""
    missing = missing_method("dtype")
    if missing is not None:
        return missing
    processing = a1111_module("modules.processing")
    img2img = getattr(processing, "StableDiffusionProcessingImg2Img", None)
    try:
        source = inspect.getsource(img2img.init)
    except (TypeError, OSError):  # no source to read: add it, a dtype attribute is harmless
        return None
    return None if "sd_model.dtype" in source else NotNeeded("not needed: img2img does not read sd_model.dtype")


def model_dtype(_self: Any) -> Any:
    """``devices.dtype``: what dev's img2img casts the inpainting mask to instead of ``sd_model.dtype``."""
    from modules import devices

    return devices.dtype


def get_first_stage_encoding(_self: Any, x: Any) -> Any:
    """The identity, as dev's: SD3's ``encode_first_stage`` already returns the scaled, shifted latent."""
    return x


MASK_FIELDS = ("mask", "nmask")
"""The latent inpainting masks A1111's img2img ``init`` builds (``1 - mask`` and ``mask``)."""


def tiles_mask_to_four() -> str | None:
    """The detector for :func:`mask_to_latent_channels`: None where img2img's ``init`` tiles the latent mask to a
    literal 4 channels (the early branch; dev tiles to ``init_latent.shape[1]``)."""
    if inferencer_class() is None:
        return f"no SD3Inferencer in {MODEL_MODULE} (no SD3 support)"
    img2img = getattr(a1111_module("modules.processing"), "StableDiffusionProcessingImg2Img", None)
    if img2img is None or not all(hasattr(img2img, name) for name in MASK_FIELDS):
        return "modules.processing has no StableDiffusionProcessingImg2Img with mask / nmask"
    try:
        source = inspect.getsource(img2img.init)
    except (TypeError, OSError):  # no source to read: apply; the descriptor only acts on a 4-channel mask
        return None
    return None if "(4, 1, 1)" in source else NotNeeded("not needed: img2img tiles the mask to the latent's channels")


def mask_to_latent_channels(p: Any, mask: Any) -> Any:
    """``p.mask`` / ``p.nmask`` as they are stored: a latent mask tiled to 4 channels (SD1/SDXL) is re-tiled to
    the model's ``latent_channels`` (SD3: 16), before ``init`` multiplies it with the 16-channel latent
    (``latent noise`` / ``latent nothing`` fills) or the sampler blends with it."""
    channels = getattr(getattr(p, "sd_model", None), "latent_channels", 4)
    shape = getattr(mask, "shape", None)
    if shape is not None and len(shape) == 3 and shape[0] == 4 and channels != 4:
        return mask[:1].repeat(channels, 1, 1)
    return mask


def mask_swaps() -> list[AttributeSwap]:
    img2img = a1111_module("modules.processing").StableDiffusionProcessingImg2Img
    return [AttributeSwap(img2img, name, lambda _default, name=name: ConvertOnSet(name, mask_to_latent_channels))
            for name in MASK_FIELDS]


LATENT_PATCH_PIXELS = 16
"""SD3 latents are 1/8 of the picture and the MMDiT cuts them into 2x2 patches: sides in multiples of 16."""


def fix_dimensions(width: int, height: int) -> tuple[int, int]:
    """Dev's ``SD3Inferencer.fix_dimensions``: round each side down to a multiple of 16."""
    return width // LATENT_PATCH_PIXELS * LATENT_PATCH_PIXELS, height // LATENT_PATCH_PIXELS * LATENT_PATCH_PIXELS


def make_process_images_inner(original: Callable[..., Any]) -> Callable[..., Any]:
    """Round an SD3 generation's size as dev's ``process_images_inner`` does, then run A1111's."""

    def process_images_inner(p: Any) -> Any:
        from modules import shared

        if getattr(shared.sd_model, "is_sd3", False) and not hasattr(shared.sd_model, "fix_dimensions"):
            p.width, p.height = fix_dimensions(p.width, p.height)
        return original(p)

    return process_images_inner


def dimension_swaps() -> list[AttributeSwap]:
    processing = a1111_module("modules.processing")
    return [AttributeSwap(processing, "process_images_inner", make_process_images_inner)]


def rounds_dimensions() -> str | None:
    """The detector for the size rounding: None where SD3Inferencer has no ``fix_dimensions`` (early)."""
    missing = missing_method("fix_dimensions")
    if missing is not None:
        return missing
    if not hasattr(a1111_module("modules.processing"), "process_images_inner"):
        return "modules.processing has no process_images_inner"
    return None


ADDED: dict[str, tuple[Any, Callable[[], str | None]]] = {
    "get_first_stage_encoding": (get_first_stage_encoding, lambda: missing_method("get_first_stage_encoding")),
    "dtype": (property(model_dtype), reads_model_dtype),
}
"""SD3Inferencer attributes the early branch's code asks for and its class lacks: (value, detector)."""


def _patch(name: str, value: Any, detect: Callable[[], str | None]) -> Patch:
    addition = AttributeAddition(inferencer_class, name, value)
    return Patch(name=f"early.{name}", feature=FEATURE, detect=detect, apply=addition.apply, undo=addition.undo)


PATCHES = (
    *(_patch(name, value, detect) for name, (value, detect) in ADDED.items()),
    Patch.from_swaps("early.inpainting_mask", FEATURE, tiles_mask_to_four, mask_swaps, sd3_only=True),
    Patch.from_swaps("early.fix_dimensions", FEATURE, rounds_dimensions, dimension_swaps, sd3_only=True),
)
DECLARED = hooks.Feature(FEATURE, patches=PATCHES)
