"""Control image -> control latent, as Stability's reference makes it (``sd3_infer.py``: ``_image_to_latent``,
``vae_encode``), with A1111's resize modes and the built-in preprocessors in front.

Order: resize to the generation size (LANCZOS), the preprocessor (none / canny / blur / invert) on the resized image,
pixels in [0, 1], the per-type scaling of the reference, VAE encode, SD3 latent shift/scale. The scaling
is the reference's, quirks included: canny maps ``img`` to ``img * 255 * 0.5 + 0.5`` (0.5 .. 128; the canny
ControlNet was trained that way), depth and blur to ``2 img - 1``, as diffusers' pipeline does for the SD3
Medium ControlNets' types (``SD3M_*``; their latent convention is the model's: :mod:`.joint`). The VAE is a callable, so A1111's
(which applies the shift/scale itself: pass ``shift_scale=False``) or a test's can be used.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from lib_sd3.controlnet.detect import ControlType

LANCZOS = Image.Resampling.LANCZOS
SD3_LATENT_SHIFT = 0.0609  # sd3_impls.SD3LatentFormat: latent = (vae(x) - shift) * scale
SD3_LATENT_SCALE = 1.5305
CANNY_LOW, CANNY_HIGH = 100, 200  # the usual opencv thresholds (0..255 gradient magnitude)
BLUR_RADIUS = 5.0  # Gaussian standard deviation in pixels

Encode = Callable[[torch.Tensor], torch.Tensor]
"""``(1, 3, H, W)`` scaled pixels -> ``(1, C, H / 8, W / 8)`` latent (before or after the SD3 shift/scale)."""


class ResizeMode(str, enum.Enum):
    """A1111's three modes, by the names its UI uses."""

    JUST_RESIZE = "Just resize"
    CROP_AND_RESIZE = "Crop and resize"
    RESIZE_AND_FILL = "Resize and fill"


def resize(image: Image.Image, width: int, height: int, mode: ResizeMode = ResizeMode.JUST_RESIZE) -> Image.Image:
    """``image`` as an RGB ``width x height`` image. Just resize stretches; crop and resize covers the frame
    keeping the aspect ratio and cuts the overhang equally on both sides; resize and fill fits inside and
    repeats the image's edge rows (or columns) over the bands left, as A1111 fills for img2img."""
    image = image.convert("RGB")
    mode = ResizeMode(mode)
    if mode is ResizeMode.JUST_RESIZE or image.size == (width, height):
        return image.resize((width, height), LANCZOS)
    cover = mode is ResizeMode.CROP_AND_RESIZE
    wider = width * image.height > image.width * height  # the frame is wider than the image
    if wider == cover:  # A1111's integer sizes: the matching side exact, the other by floor division
        inner_w, inner_h = width, max(1, image.height * width // image.width)
    else:
        inner_w, inner_h = max(1, image.width * height // image.height), height
    inner = image.resize((inner_w, inner_h), LANCZOS)
    out = Image.new("RGB", (width, height))
    left, top = width // 2 - inner_w // 2, height // 2 - inner_h // 2
    out.paste(inner, (left, top))
    if not cover:
        def edge(box: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
            return inner.crop(box).resize(size, Image.Resampling.NEAREST)  # one row / column, repeated

        if top > 0:
            out.paste(edge((0, 0, inner_w, 1), (inner_w, top)), (left, 0))
            out.paste(edge((0, inner_h - 1, inner_w, inner_h), (inner_w, height - top - inner_h)), (left, top + inner_h))
        if left > 0:
            out.paste(edge((0, 0, 1, inner_h), (left, inner_h)), (0, top))
            out.paste(edge((inner_w - 1, 0, inner_w, inner_h), (width - left - inner_w, inner_h)), (left + inner_w, top))
    return out


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White edges on black (opencv's Canny on the grey image), as RGB."""
    try:
        import cv2
    except ImportError:
        raise RuntimeError("the canny preprocessor needs opencv (opencv-python-headless); it is in A1111's venv, "
                           "or give an edge map with preprocessor 'none'") from None
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(cv2.Canny(grey, int(low), int(high))).convert("RGB")


def blur(image: Image.Image, radius: float = BLUR_RADIUS) -> Image.Image:
    """A Gaussian blur of standard deviation ``radius`` pixels (the blur ControlNet's input, e.g. for upscaling)."""
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    return image.convert("RGB").filter(ImageFilter.GaussianBlur(radius))


def none(image: Image.Image) -> Image.Image:
    """The image is already a control map."""
    return image.convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """Dark <-> bright. Stability's depth ControlNet takes near = dark, far = bright (its example
    ``inputs/depth.png``); MiDaS / Depth Anything maps (and the ControlNet extension's) are near = bright."""
    return ImageOps.invert(image.convert("RGB"))


PREPROCESSORS: Mapping[str, Callable[..., Image.Image]] = {"none": none, "canny": canny, "blur": blur,
                                                            "invert": invert}


def pixels(image: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in [0, 1], as the reference reads a PIL image."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: what the VAE expects (Stability's depth / blur, and every SD3 Medium ControlNet in
    diffusers' layout: its pipeline normalises every control image so)."""
    return 2.0 * x - 1.0


def stability_canny(x: torch.Tensor) -> torch.Tensor:
    """Stability's canny ControlNet was trained on ``img * 255 * 0.5 + 0.5`` (0.5 .. 128)."""
    return x * 255 * 0.5 + 0.5


SCALING: Mapping[ControlType, Callable[[torch.Tensor], torch.Tensor]] = {ControlType.CANNY: stability_canny}
"""The types whose pixels are not scaled by :func:`to_signed`."""


def scale_for_type(x: torch.Tensor, control_type: ControlType) -> torch.Tensor:
    """The per-type scaling of [0, 1] pixels before the VAE (Stability's reference; diffusers' pipeline for the
    ``SD3M_*`` types)."""
    return SCALING.get(ControlType(control_type), to_signed)(x)


def shift_scale(latent: torch.Tensor) -> torch.Tensor:
    return (latent - SD3_LATENT_SHIFT) * SD3_LATENT_SCALE


def control_map(image: Image.Image, width: int, height: int, preprocessor: str = "none",
                resize_mode: ResizeMode = ResizeMode.JUST_RESIZE, **params: Any) -> Image.Image:
    """The preprocessed control map at the generation size (what a preview shows)."""
    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {preprocessor!r} (known: {', '.join(PREPROCESSORS)})")
    return PREPROCESSORS[preprocessor](resize(image, width, height, resize_mode), **params)


def control_latent(control: Image.Image, control_type: ControlType, encode: Encode, *,
                   shift_scale_latent: bool = True) -> torch.Tensor:
    """The ``(1, C, H / 8, W / 8)`` latent a :class:`~lib_sd3.controlnet.control.ControlUnit` takes, from a control
    map at the generation size. ``shift_scale_latent=False`` when ``encode`` applies the SD3 shift/scale itself
    (A1111's ``encode_first_stage``)."""
    with torch.no_grad():
        latent = encode(scale_for_type(pixels(control), control_type))
    return shift_scale(latent) if shift_scale_latent else latent
