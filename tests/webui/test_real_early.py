"""img2img, inpainting, hires fix and long prompts on SD3, on both A1111 states (issue 13).

On the early SD3 branch (34b4443c) without the extension every img2img answered HTTP 500 (no
``SD3Inferencer.get_first_stage_encoding``) and any prompt over 75 CLIP tokens failed in CLIP's
position embedding; dev has both. Each case runs the same request on whichever states are
configured: HTTP 200, a finite image, no traceback in the server log.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from webui_support import TINY, decode_image, tracebacks_in, txt2img

WORDS = ("cat dog red blue green house tree river stone cloud sun moon star boat car road city field flower bird "
         "fish horse light dark small big old new warm cold").split()
"""Common English words, one CLIP token each."""


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def clip_count(text: str) -> int:
    open_clip = pytest.importorskip("open_clip")
    return len(open_clip.tokenizer.SimpleTokenizer().encode(text))


def png_b64(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def init_image(size: int = 64) -> str:
    ramp = np.linspace(0, 255, size)
    return png_b64(np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                             np.full((size, size), 128.0)], axis=-1))


def square_mask(size: int = 64) -> str:
    mask = np.zeros((size, size, 3))
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return png_b64(mask)


def checked(webui, route: str, payload: dict) -> tuple[list[np.ndarray], dict]:
    """POST; assert HTTP 200, finite images and a clean server log; return (images, info)."""
    mark = webui.mark()
    response = webui.post(route, payload)
    log = webui.log_since(mark)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:2000]}\n{log[-3000:]}"
    assert not tracebacks_in(log), tracebacks_in(log)
    body = response.json()
    images = [decode_image(image) for image in body["images"]]
    assert images and all(np.isfinite(image).all() for image in images)
    info = json.loads(body["info"]) if isinstance(body.get("info"), str) else body.get("info", {})
    return images, info


def img2img(webui, **overrides) -> tuple[list[np.ndarray], dict]:
    payload = dict(TINY, init_images=[init_image()], denoising_strength=0.6)
    payload.update(overrides)
    return checked(webui, "/sdapi/v1/img2img", payload)


@pytest.mark.parametrize("denoising", [0.3, 0.6, 1.0])
def test_img2img(webui, denoising):
    images, _ = img2img(webui, denoising_strength=denoising)
    assert images[0].shape == (64, 64, 3)


@pytest.mark.parametrize("fill", [0, 1, 2, 3])  # fill, original, latent noise, latent nothing
@pytest.mark.parametrize("only_masked", [False, True])
def test_inpainting(webui, fill, only_masked):
    images, _ = img2img(webui, mask=square_mask(), inpainting_fill=fill, inpaint_full_res=only_masked,
                        inpaint_full_res_padding=8, mask_blur=2)
    assert images[0].shape == (64, 64, 3)


def test_img2img_batch(webui):
    images, _ = img2img(webui, init_images=[init_image(), init_image()], batch_size=2)
    assert len(images) == 2


def test_hires_fix_non_latent_upscaler(webui):
    """A non-latent upscaler decodes, upscales the picture and encodes it again through the VAE."""
    images, _ = checked(webui, "/sdapi/v1/txt2img", dict(TINY, enable_hr=True, hr_upscaler="Lanczos", hr_scale=1.5,
                                                          hr_second_pass_steps=2, denoising_strength=0.5))
    assert images[0].shape == (96, 96, 3)


def test_hires_fix_latent_upscaler(webui):
    images, _ = checked(webui, "/sdapi/v1/txt2img", dict(TINY, enable_hr=True, hr_upscaler="Latent", hr_scale=1.5,
                                                          hr_second_pass_steps=2, denoising_strength=0.6))
    assert images[0].shape == (96, 96, 3)


def test_long_prompt(webui):
    """300 CLIP tokens: HTTP 200, and the tokens after the first 75 change the picture."""
    long = words(300)
    assert clip_count(long) == 300
    image, _, log = txt2img(webui, prompt=long)
    assert np.isfinite(image).all() and not tracebacks_in(log), tracebacks_in(log)
    cut, _, _ = txt2img(webui, prompt=words(75))
    assert np.abs(image - cut).max() > 0, "the tokens after the first 75 were ignored"


def test_break_prompt(webui):
    image, _, log = txt2img(webui, prompt="a cat BREAK a dog on a red sofa")
    assert np.isfinite(image).all() and not tracebacks_in(log), tracebacks_in(log)
    joined, _, _ = txt2img(webui, prompt="a cat a dog on a red sofa")
    assert np.abs(image - joined).max() > 0, "BREAK had no effect"


def test_emphasis_prompt(webui):
    image, _, log = txt2img(webui, prompt="a (cat:1.5) on a [red] sofa")
    assert np.isfinite(image).all() and not tracebacks_in(log), tracebacks_in(log)
    plain, _, _ = txt2img(webui, prompt="a cat on a red sofa")
    assert np.abs(image - plain).max() > 0, "emphasis had no effect"


def test_long_prompt_counted_as_on_dev(webui):
    """The counter's numbers for a long prompt are dev's on both states: whole 75-token chunks, no limit."""
    long = words(300)
    response = webui.sd3_route("POST", "/sd3/token-count", {"prompt": long})
    assert response.status_code == 200, response.text
    prompt = response.json()["prompt"]
    expected = clip_count(long)
    print(f"\n[{webui.state}] /sd3/token-count (300 tokens) -> {prompt}")
    chunks = math.ceil(expected / 75)
    assert prompt["clip"]["count"] == expected
    assert prompt["clip"]["target"] == chunks * 75
    assert prompt["clip"]["limit"] is None, "counted with the early branch's single 75-token window"
    assert prompt["t5"]["limit"] == 77 * chunks


def test_size_not_a_multiple_of_16(webui):
    """SD3's 2x2 latent patches need sides that are multiples of 16 pixels; dev rounds down (``fix_dimensions``)."""
    images, _ = checked(webui, "/sdapi/v1/txt2img", dict(TINY, width=72, height=72))
    assert images[0].shape in ((64, 64, 3), (72, 72, 3))
