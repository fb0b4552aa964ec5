"""Control image -> control latent against the formulas of Stability's reference (sd3_infer.py: ``_image_to_latent``,
``vae_encode``, ``SD3LatentFormat.process_in``), written out here as the oracle."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from lib_sd3.controlnet import preprocess
from lib_sd3.controlnet.detect import ControlType
from lib_sd3.controlnet.preprocess import ResizeMode

HAS_CV2 = importlib.util.find_spec("cv2") is not None


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def fake_vae(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in encoder: 8x8 average pooling and a fixed 3 -> 16 channel map."""
    weights = torch.linspace(-1, 1, 48).reshape(16, 3, 1, 1)
    return torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(pixels, 8), weights)


def reference_latent(image: Image.Image, width: int, height: int, control_type: int) -> torch.Tensor:
    """The reference, step by step: LANCZOS resize, /255, NCHW, per-type scaling, encode, process_in."""
    image = image.resize((width, height), Image.LANCZOS).convert("RGB")
    array = np.moveaxis(np.array(image).astype(np.float32) / 255.0, 2, 0)[None]
    x = torch.from_numpy(array)
    x = x * 255 * 0.5 + 0.5 if control_type == 1 else 2.0 * x - 1.0
    return (fake_vae(x) - 0.0609) * 1.5305


@pytest.mark.parametrize("control_type", list(ControlType))
def test_latent_of_each_type_equals_the_reference(control_type):
    image = photo(100, 70)
    control = preprocess.control_map(image, 64, 48, "none")
    got = preprocess.control_latent(control, control_type, fake_vae)
    expected = reference_latent(image, 64, 48, int(control_type))
    assert got.shape == (1, 16, 6, 8)
    assert torch.equal(got, expected)


def test_scaling_ranges_are_the_references():
    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert preprocess.scale_for_type(white, ControlType.CANNY).max() == 128.0
    assert preprocess.scale_for_type(black, ControlType.CANNY).min() == 0.5
    for kind in (ControlType.DEPTH, ControlType.BLUR):
        assert preprocess.scale_for_type(white, kind).max() == 1.0
        assert preprocess.scale_for_type(black, kind).min() == -1.0


def test_encoder_that_applies_the_shift_scale_itself():
    control = photo(32, 32)
    def shifted(x):
        return (fake_vae(x) - 0.0609) * 1.5305
    assert torch.equal(preprocess.control_latent(control, ControlType.DEPTH, shifted, shift_scale_latent=False),
                       preprocess.control_latent(control, ControlType.DEPTH, fake_vae))


def test_just_resize_is_a_lanczos_resize():
    image = photo(90, 40)
    assert np.array_equal(np.asarray(preprocess.resize(image, 64, 64, ResizeMode.JUST_RESIZE)),
                          np.asarray(image.resize((64, 64), Image.LANCZOS)))


def test_crop_and_resize_cuts_the_overhang_equally():
    image = photo(64, 32)  # twice as wide as the 32x32 frame: no scaling, 16 columns cut on each side
    out = np.asarray(preprocess.resize(image, 32, 32, ResizeMode.CROP_AND_RESIZE))
    assert np.array_equal(out, np.asarray(image)[:, 16:48])


def test_resize_and_fill_stretches_the_edges_over_the_bands():
    image = photo(32, 64)  # half as wide as the 64x64 frame: no scaling, 16-column bands on each side
    out = np.asarray(preprocess.resize(image, 64, 64, ResizeMode.RESIZE_AND_FILL)).astype(int)
    source = np.asarray(image).astype(int)
    assert np.array_equal(out[:, 16:48], source)
    assert np.abs(out[:, :16] - source[:, :1]).max() == 0  # the first column, repeated
    assert np.abs(out[:, 48:] - source[:, -1:]).max() == 0


@pytest.mark.skipif(not HAS_CV2, reason="opencv (cv2) is not in the test venv; A1111's venv has "
                                        "opencv-python-headless")
def test_canny_is_opencvs_on_the_grey_image():
    import cv2

    image = Image.new("RGB", (64, 64), (20, 30, 40))
    image.paste((230, 200, 90), (16, 20, 48, 44))  # a bright box: its outline is the edge map
    got = np.asarray(preprocess.control_map(image, 64, 64, "canny", low=50, high=120))
    edges = cv2.Canny(np.asarray(image.convert("L")), 50, 120)
    assert np.array_equal(got[..., 0], edges) and np.array_equal(got[..., 2], edges)
    assert 0 < edges.mean() < 255


def test_canny_without_opencv_says_how_to_do_without(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(RuntimeError, match="opencv.*preprocessor 'none'"):
        preprocess.control_map(photo(16, 16), 16, 16, "canny")


def test_blur_is_a_gaussian_of_the_resized_image():
    image = photo(80, 80)
    got = preprocess.control_map(image, 64, 64, "blur", radius=3)
    expected = image.resize((64, 64), Image.LANCZOS).filter(ImageFilter.GaussianBlur(3))
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert np.asarray(got).std() < np.asarray(image).std() / 2


def test_bad_parameters_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown preprocessor 'depth_anything'"):
        preprocess.control_map(photo(16, 16), 16, 16, "depth_anything")
    with pytest.raises(ValueError, match="blur radius"):
        preprocess.control_map(photo(16, 16), 16, 16, "blur", radius=-1)


def test_invert_turns_a_near_bright_depth_map_into_stabilitys_near_dark():
    near_bright = Image.new("RGB", (16, 16), (10, 10, 10))
    near_bright.paste((240, 240, 240), (4, 4, 12, 12))
    out = np.asarray(preprocess.control_map(near_bright, 16, 16, "invert"))
    assert out[8, 8].tolist() == [15, 15, 15] and out[0, 0].tolist() == [245, 245, 245]
