"""SD3.5 Large ControlNets in a real A1111: the accordion's / API's units (``controlnet_<n>_*`` in the SD3 script's
args) on a tiny SD3.5-Large-shaped base with the tiny blur / canny / depth ControlNets of tests/webui/build_assets.py.

What a user would check: the image follows the control and its strength / window; strength 0 is bit-identical
to no unit; img2img without a control image uses the init image; hires; MixDQ and SLG together with a unit; a
ControlNet that does not fit (wrong base, truncated, unknown name) is one line (HTTP 422), never a traceback;
``GET /sd3/controlnet`` lists what is there. Every case ends with sd3-tiny loaded again.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from webui_support import TINY, decode_image, tracebacks_in, txt2img

SD3, LARGE = "sd3-tiny.safetensors", "sd35-large-tiny.safetensors"
CANNY, DEPTH, BLUR = (f"sd3.5_large_controlnet_{kind}-tiny" for kind in ("canny", "depth", "blur"))
TRUNCATED = "sd3.5_large_controlnet_broken-truncated"


def control_png(size: int = 64) -> str:
    """A white square on black: clear canny edges, a depth step, a blur target."""
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def sd3_args(**args) -> dict:
    return {"alwayson_scripts": {"SD3": {"args": [args]}}}


def unit(model: str = CANNY, n: int = 1, **fields) -> dict:
    args = {"model": model, "image": control_png(), **fields}
    return {f"controlnet_{n}_{k}": v for k, v in args.items()}


def switch(webui, name: str) -> None:
    response = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": name})
    assert response.status_code == 200, response.text


@contextlib.contextmanager
def loaded(webui, name: str):
    switch(webui, name)
    try:
        yield
    finally:
        switch(webui, SD3)


def generate(webui, request: dict | None = None, **args):
    image, info, log = txt2img(webui, sampler_name="Euler", **(request or {}), **(sd3_args(**args) if args else {}))
    assert not tracebacks_in(log), tracebacks_in(log)
    return image, info.get("extra_generation_params", {}), log


@pytest.fixture
def listing(webui):
    response = webui.get("/sd3/controlnet")
    if response.status_code == 404:
        pytest.skip("no ControlNet in this build of the extension")
    assert response.status_code == 200, response.text
    return response.json()


def test_route_lists_the_controlnets_found(webui, listing):
    found = {c["name"]: c for c in listing["controlnets"]}
    assert {name: found[name]["type"] for name in (CANNY, DEPTH, BLUR)} == {CANNY: "canny", DEPTH: "depth",
                                                                              BLUR: "blur"}
    assert found[CANNY]["base"] == "an SD3 model of width 192" or "Large" in found[CANNY]["base"]
    assert TRUNCATED in listing["not_offered"] and "truncated" in listing["not_offered"][TRUNCATED]
    assert any(folder.endswith("ControlNet") for folder in listing["folders"])


def test_a_unit_steers_and_follows_strength_and_window(webui, listing):
    with loaded(webui, LARGE):
        none, params, _ = generate(webui)
        assert not any(k.startswith("SD3 ControlNet") for k in params)
        full, params, _ = generate(webui, **unit(preprocessor="canny"))
        entry = params["SD3 ControlNet 1"]
        assert entry.startswith(f"model {CANNY} [") and "type canny; preprocessor canny; canny low 100; " \
            "canny high 200; strength 1; steps 0-1; resize Just resize" in entry, entry
        assert np.abs(full.astype(int) - none.astype(int)).max() > 0  # the control changes the image
        zero, params, _ = generate(webui, **unit(preprocessor="canny", strength=0))
        assert np.array_equal(zero, none)  # strength 0: bit-identical to no ControlNet
        assert params["SD3 ControlNet 1"] == "off (strength 0)"
        half, _, _ = generate(webui, **unit(preprocessor="canny", strength=0.5))
        late, params, _ = generate(webui, **unit(preprocessor="canny", start=0.5, end=1))
        never, _, _ = generate(webui, **unit(preprocessor="canny", start=0.9, end=1.0))  # 4 steps: 0, .25, .5, .75
        assert "steps 0.5-1" in params["SD3 ControlNet 1"]
        for other in (half, late):
            assert not np.array_equal(other, full) and not np.array_equal(other, none)
        assert np.array_equal(never, none)  # no step in its window: nothing attached
        status = webui.status()["features"]["ControlNet"]
        assert [m["name"] for m in status["loaded"]] == [f"{CANNY}.safetensors"]


def test_two_units_and_every_type(webui, listing):
    with loaded(webui, LARGE):
        depth, params, _ = generate(webui, **unit(DEPTH, preprocessor="invert"), **unit(BLUR, n=2, preprocessor="blur",
                                                                                          blur_radius=2))
        assert "type depth; preprocessor invert" in params["SD3 ControlNet 1"]
        assert "type blur; preprocessor blur; blur radius 2" in params["SD3 ControlNet 2"]
        only_depth, _, _ = generate(webui, **unit(DEPTH, preprocessor="invert"))
        assert not np.array_equal(depth, only_depth)
        listing = webui.get("/sd3/controlnet").json()
        assert sorted(m["name"] for m in listing["loaded"]) == sorted([f"{DEPTH}.safetensors"])  # blur released


def test_img2img_uses_the_init_image_and_hires_follows_the_second_pass(webui, listing):
    with loaded(webui, LARGE):
        payload = dict(TINY, sampler_name="Euler", init_images=[control_png()], denoising_strength=0.6)
        plain = webui.post("/sdapi/v1/img2img", payload)
        assert plain.status_code == 200, plain.text
        args = unit(BLUR, preprocessor="none")
        del args["controlnet_1_image"]  # no control image: the init image is the control image
        steered = webui.post("/sdapi/v1/img2img", dict(payload, **sd3_args(**args)))
        assert steered.status_code == 200, steered.text
        info = json.loads(steered.json()["info"])
        assert "type blur" in info["extra_generation_params"]["SD3 ControlNet 1"]
        assert not np.array_equal(decode_image(plain.json()["images"][0]), decode_image(steered.json()["images"][0]))
        mark = webui.mark()
        hires = {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "hr_upscaler": "Latent",
                 "denoising_strength": 0.5}
        image, params, _ = generate(webui, hires, **unit(preprocessor="canny"))
        assert image.shape[:2] == (128, 128) and "SD3 ControlNet 1" in params
        assert not tracebacks_in(webui.log_since(mark))


def test_with_slg_and_mixdq(webui, listing):
    with loaded(webui, LARGE):
        plain, _, _ = generate(webui, **unit(preprocessor="canny"))
        slg, params, _ = generate(webui, slg="on", slg_layers="1", slg_scale=2.0, slg_start=0.0, slg_end=1.0,
                                  **unit(preprocessor="canny"))
        assert "SD3 SLG" in params and "SD3 ControlNet 1" in params and not np.array_equal(plain, slg)
        quantized, params, _ = generate(webui, mixdq="w8a8", **unit(preprocessor="canny"))
        assert params.get("SD3 MixDQ") and "SD3 ControlNet 1" in params
        loaded_now = webui.get("/sd3/controlnet").json()["loaded"]
        assert [m["mixdq"] for m in loaded_now] == [f"{params['SD3 MixDQ']} (ControlNet)"]  # its blocks too
        back, _, _ = generate(webui, mixdq="off", **unit(preprocessor="canny"))
        assert [m["mixdq"] for m in webui.get("/sd3/controlnet").json()["loaded"]] == [None]
        assert np.array_equal(back, plain)  # MixDQ off restores the base and the ControlNet bit for bit


@pytest.mark.parametrize("model, words", [
    (TRUNCATED, ["truncated"]),
    ("no-such-controlnet", ["no SD3 ControlNet named", "GET /sd3/controlnet"]),
])
def test_a_controlnet_that_cannot_run_is_one_line(webui, listing, model, words):
    with loaded(webui, LARGE):
        mark = webui.mark()
        response = webui.post("/sdapi/v1/txt2img", dict(TINY, **sd3_args(**unit(model))))
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert all(word in detail for word in words) and "\n" not in detail, detail
        assert not tracebacks_in(webui.log_since(mark))


def test_a_large_controlnet_on_another_base_is_one_line(webui, listing):
    mark = webui.mark()  # sd3-tiny (SD3 Medium shape) is loaded
    response = webui.post("/sdapi/v1/txt2img", dict(TINY, **sd3_args(**unit(CANNY))))
    assert response.status_code == 422, response.text
    assert "does not fit the loaded SD3 Medium" in response.json()["detail"]
    assert not tracebacks_in(webui.log_since(mark))


UNIT_TEXT = (f"model {CANNY} [0123456789]; type canny; preprocessor canny; canny low 50; canny high 150; "
             "strength 0.6; steps 0.25-0.75; resize Crop and resize")


def test_a_pasted_infotext_restores_the_unit_through_the_api(webui, listing):
    """The API's ``infotext`` field (A1111 reads it with the script's paste fields): the unit comes back, and in
    img2img it runs on the init image."""
    with loaded(webui, LARGE):
        payload = dict(TINY, sampler_name="Euler", init_images=[control_png()], denoising_strength=0.6,
                       infotext=f"a cat\nSteps: 4, Sampler: Euler, SD3 flow samplers: True, SD3 ControlNet 1: "
                                f"\"{UNIT_TEXT}\"")
        response = webui.post("/sdapi/v1/img2img", payload)
        assert response.status_code == 200, response.text[:2000]
        entry = json.loads(response.json()["info"])["extra_generation_params"]["SD3 ControlNet 1"]
        assert entry.split(" [")[0] == f"model {CANNY}" and entry.split("]; ", 1)[1] == UNIT_TEXT.split("]; ", 1)[1]


def test_ui_unit_fields_paste_back_and_preview(webui, listing):
    """In the browser: the paste button fills unit 1's fields from an infotext; an uploaded image with the canny
    preprocessor shows its map in the preview."""
    from webui_support import browser_page

    text = f"a cat\nSteps: 4, Sampler: Euler, SD3 flow samplers: True, SD3 ControlNet 1: \"{UNIT_TEXT}\""
    png = base64.b64decode(control_png(128))
    field = "() => document.querySelector('#sd3_controlnet_1_{}_txt2img input').value"
    with browser_page(webui) as page:
        page.locator("#txt2img_prompt textarea").fill(text)
        page.locator("#tab_txt2img #paste").click()
        page.wait_for_function(f"() => ({field.format('model')})() === '{CANNY}'")
        seen = {name: page.evaluate(field.format(name)) for name in ("model", "type", "preprocessor")}
        strength = float(page.evaluate("() => document.querySelector("
                                       "'#sd3_controlnet_1_strength_txt2img input[type=number]').value"))
        page.locator("#sd3_accordion_txt2img .label-wrap").first.click()
        page.locator("#sd3_controlnet_txt2img .label-wrap").first.click()
        page.locator("#sd3_controlnet_1_image_txt2img input[type=file]").set_input_files(
            files=[{"name": "square.png", "mimeType": "image/png", "buffer": png}])
        page.locator("#sd3_controlnet_1_make_preview_txt2img").click()
        page.wait_for_function("() => !!document.querySelector('#sd3_controlnet_1_preview_txt2img img')", timeout=30_000)
        src = page.evaluate("() => document.querySelector('#sd3_controlnet_1_preview_txt2img img').src")
    print(f"\n[{webui.state}] pasted unit 1 -> {seen}, strength {strength}; preview {src[:40]}...")
    assert seen == {"model": CANNY, "type": "canny", "preprocessor": "canny"} and strength == 0.6
    assert src.startswith(("data:image/png;base64,", "http"))


def test_batches_and_inpainting(webui, listing):
    """Batch size 2 (a CFG batch of 4 rows): every image gets the control; inpainting keeps the unmasked part."""
    with loaded(webui, LARGE):
        def batch(**args) -> list[np.ndarray]:
            response = webui.post("/sdapi/v1/txt2img", dict(TINY, sampler_name="Euler", batch_size=2,
                                                             **(sd3_args(**args) if args else {})))
            assert response.status_code == 200, response.text[:2000]
            return [decode_image(b64) for b64 in response.json()["images"][:2]]

        plain, steered = batch(), batch(**unit(preprocessor="canny"))
        assert all(not np.array_equal(a, b) for a, b in zip(plain, steered, strict=True))  # each image steered
        assert all(np.array_equal(a, b) for a, b in zip(plain, batch(**unit(strength=0)), strict=True))
        mask = np.zeros((64, 64, 3), np.uint8)
        mask[:, 32:] = 255
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG")
        payload = dict(TINY, sampler_name="Euler", init_images=[control_png()], denoising_strength=0.8,
                       mask=base64.b64encode(buffer.getvalue()).decode(), inpainting_fill=1,
                       **sd3_args(**unit(BLUR, preprocessor="blur")))
        mark = webui.mark()
        response = webui.post("/sdapi/v1/img2img", payload)
        assert response.status_code == 200, response.text[:2000]
        assert "SD3 ControlNet 1" in json.loads(response.json()["info"])["extra_generation_params"]
        assert not tracebacks_in(webui.log_since(mark))


MEDIUM_POSE = "sd3_controlnet_pose-tiny"


def test_an_sd3_medium_controlnet_in_diffusers_layout_steers_sd3_medium(webui, listing):
    """InstantX's form on the SD3-Medium-shaped sd3-tiny: listed with its type from the name, steers, strength 0
    is bit-identical, with SLG and MixDQ too; on SD3.5 Large it is one line."""
    found = {c["name"]: c for c in listing["controlnets"]}
    assert found[MEDIUM_POSE]["type"] == "sd3m_pose" and found[MEDIUM_POSE]["blocks"] == 1
    none, _, _ = generate(webui)
    steered, params, _ = generate(webui, **unit(MEDIUM_POSE))
    assert "type sd3m_pose; preprocessor none" in params["SD3 ControlNet 1"], params
    assert np.abs(steered.astype(int) - none.astype(int)).max() > 0
    zero, _, _ = generate(webui, **unit(MEDIUM_POSE, strength=0))
    assert np.array_equal(zero, none)
    slg, params, _ = generate(webui, slg="on", slg_layers="0", slg_scale=2.0, slg_start=0.0, slg_end=1.0,
                              **unit(MEDIUM_POSE))
    assert "SD3 SLG" in params and "SD3 ControlNet 1" in params and not np.array_equal(slg, steered)
    quantized, params, _ = generate(webui, mixdq="w8a8", **unit(MEDIUM_POSE))
    assert params.get("SD3 MixDQ") and "SD3 ControlNet 1" in params
    back, _, _ = generate(webui, mixdq="off", **unit(MEDIUM_POSE))
    assert np.array_equal(back, steered)  # MixDQ off restores both models bit for bit
    with loaded(webui, LARGE):
        mark = webui.mark()
        response = webui.post("/sdapi/v1/txt2img", dict(TINY, **sd3_args(**unit(MEDIUM_POSE))))
        assert response.status_code == 422, response.text
        assert "does not fit the loaded" in response.json()["detail"] and "\n" not in response.json()["detail"]
        assert not tracebacks_in(webui.log_since(mark))


def test_a_lora_on_the_base_works_beside_a_unit(webui, listing):
    """``<lora:...>`` on the base (kohya keys on the MMDiT's image-stream Linears) still applies with a unit on, and
    the unit still steers with the LoRA on; the LoRA never reaches the ControlNet."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    prefix = "model.diffusion_model."
    generator = torch.Generator().manual_seed(31)
    lora = {}
    with safe_open(str(webui.data_dir / "models" / "Stable-diffusion" / SD3), "pt") as checkpoint:
        for key in checkpoint.keys():
            if key.startswith(prefix) and key.endswith((".x_block.attn.qkv.weight", ".x_block.mlp.fc1.weight")):
                weight = checkpoint.get_tensor(key).float()
                name = "lora_unet_" + key[len(prefix):-len(".weight")].replace(".", "_")
                lora[f"{name}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
                lora[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=generator) * float(weight.std())
                lora[f"{name}.alpha"] = torch.tensor(4.0)
    folder = webui.data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(folder / "sd3cn_lora.safetensors"))
    assert webui.post("/sdapi/v1/refresh-loras").status_code == 200
    with_lora = {"prompt": "a cat <lora:sd3cn_lora:1>"}
    lora_only, params, _ = generate(webui, with_lora)
    both, params_both, _ = generate(webui, with_lora, **unit(MEDIUM_POSE))
    unit_only, _, _ = generate(webui, **unit(MEDIUM_POSE))
    assert "SD3 LoRA not applied" not in params and "SD3 LoRA not applied" not in params_both
    assert not np.array_equal(both, lora_only) and not np.array_equal(both, unit_only)
    assert "SD3 ControlNet 1" in params_both
