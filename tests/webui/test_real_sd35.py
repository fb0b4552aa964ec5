"""SD3.5 Large / Medium in a real A1111 (issue 14): load, generate, report the family, switch, bad files,
and the features on top of SD3.5: SLG on the MMDiT-X model, presets per family, MixDQ's ``attn2`` layers.

The assets hold tiny SD3-, SD3.5-Large- and SD3.5-Medium-shaped checkpoints (tests/webui/build_assets.py)
and an SD3-shaped file cut short. Every case ends with sd3-tiny loaded again, as the other cases expect.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from webui_support import decode_image, tracebacks_in, txt2img

FEATURE = "SD3.5 models"
SD3, LARGE, MEDIUM = "sd3-tiny.safetensors", "sd35-large-tiny.safetensors", "sd35-medium-tiny.safetensors"
TRUNCATED = "sd3-broken-truncated.safetensors"
FAMILY = {SD3: ("sd3-medium", "SD3 Medium"), LARGE: ("sd3.5-large", "SD3.5 Large"),
          MEDIUM: ("sd3.5-medium", "SD3.5 Medium")}
LATENT_KEY = "SD3 test latent"
MAX_LATENT_STD = 20.0
"""A random tiny MMDiT gives latents of std ~1-3 with 4 Euler steps; beyond this something blew up."""


def checkpoint(webui) -> str:
    response = webui.get("/sdapi/v1/options")
    response.raise_for_status()
    return response.json()["sd_model_checkpoint"]


def switch(webui, name: str, status: int = 200) -> str:
    """Select a checkpoint through ``/sdapi/v1/options``; return the server log of the switch."""
    mark = webui.mark()
    response = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": name})
    assert response.status_code == status, response.text
    return webui.log_since(mark)


@contextlib.contextmanager
def back_to_sd3(webui):
    try:
        yield
    finally:
        switch(webui, SD3)


def family_status(webui) -> dict:
    features = webui.status()["features"]
    if FEATURE not in features:
        pytest.skip(f"{FEATURE!r} is not in this build of the extension")
    return features[FEATURE]


def generate(webui, **overrides) -> tuple[np.ndarray, dict, str]:
    image, info, log = txt2img(webui, **dict({"sampler_name": "Euler"}, **overrides))
    recorded = info.get("extra_generation_params", {}).get(LATENT_KEY, "").split()
    assert len(recorded) == 4, f"no {LATENT_KEY!r} in the infotext: {info.get('extra_generation_params')}"
    finite, std = recorded[1] == "1", float(recorded[3])
    assert finite and 0 < std < MAX_LATENT_STD, f"final latent finite={finite} std={std}"
    assert np.isfinite(image).all()
    assert not tracebacks_in(log), tracebacks_in(log)
    return image, info, log


def _mixdq(value: str) -> dict:
    return {"alwayson_scripts": {"SD3": {"args": [{"mixdq": value}]}}}


def test_startup_model_reports_its_family(webui):
    """The model A1111 loads at start-up (sd3-tiny, ``--ckpt``) went through the construction patch too."""
    assert checkpoint(webui).startswith(SD3)
    assert family_status(webui)["family"] == "sd3-medium"


def test_each_family_loads_generates_and_reports_itself(webui):
    with back_to_sd3(webui):
        for name in (LARGE, MEDIUM, SD3):
            log = switch(webui, name)
            assert not tracebacks_in(log), tracebacks_in(log)
            assert checkpoint(webui).startswith(name), f"{name} was not loaded: {checkpoint(webui)}"
            status = family_status(webui)
            assert (status["family"], status["label"]) == FAMILY[name], status
            assert status["mmdit"] == "sd-webui-sd3", status  # every family, SD3 Medium too (issue 21)
            _, info, _ = generate(webui)
            assert info["extra_generation_params"].get("SD3 family") == FAMILY[name][1], info["extra_generation_params"]
            print(f"\n[{webui.state}] {name}: {status}")


def _round_trip(webui, order: list[str], **extra) -> dict[str, list[np.ndarray]]:
    images: dict[str, list[np.ndarray]] = {}
    for name in order:
        log = switch(webui, name)
        assert not tracebacks_in(log), tracebacks_in(log)
        assert checkpoint(webui).startswith(name)
        assert family_status(webui)["family"] == FAMILY[name][0]
        image, _, _ = generate(webui, **extra)
        images.setdefault(name, []).append(image)
    return images


ORDER = [SD3, LARGE, MEDIUM, SD3, MEDIUM, LARGE, SD3]
"""Every pair in both directions: SD3 -> L -> M -> SD3 -> M -> L -> SD3."""


def test_switching_both_directions_gives_the_same_images(webui):
    with back_to_sd3(webui):
        images = _round_trip(webui, ORDER, **_mixdq("off"))
    for name, seen in images.items():
        for other in seen[1:]:
            assert np.array_equal(seen[0], other), f"{name} gives another image after a round trip"
    assert not np.array_equal(images[LARGE][0], images[MEDIUM][0])


def test_switching_with_mixdq_on(webui):
    if webui.get("/sd3/mixdq").status_code != 200:
        pytest.skip("no MixDQ in this build")
    with back_to_sd3(webui):
        switch(webui, LARGE)
        mark = webui.mark()
        response = webui.post("/sdapi/v1/txt2img", dict(_tiny(), **_mixdq("w8a8")))
        if response.status_code != 200:
            pytest.skip(f"MixDQ refuses SD3.5 on this branch (lead re-runs after the mixdq merge): "
                        f"{response.text[:300]} {webui.log_since(mark)[-300:]}")
        images = _round_trip(webui, ORDER, **_mixdq("w8a8"))
        txt2img(webui, **_mixdq("off"))
    for name, seen in images.items():
        for other in seen[1:]:
            assert np.array_equal(seen[0], other), f"{name} with MixDQ gives another image after a round trip"


def _tiny() -> dict:
    from webui_support import TINY

    return dict(TINY, sampler_name="Euler")


def test_truncated_checkpoint_is_refused_and_the_previous_model_stays(webui):
    with back_to_sd3(webui):
        switch(webui, LARGE)
        before, _, _ = generate(webui)
        log = switch(webui, TRUNCATED, status=422)  # the API client sees the refusal (issue 22)
        assert "truncated" in log and TRUNCATED in log, log[-3000:]
        assert "the previous model stays loaded" in log, log[-3000:]
        assert len([line for line in log.splitlines() if TRUNCATED in line]) == 1, log[-3000:]
        assert not tracebacks_in(log), tracebacks_in(log)
        assert checkpoint(webui).startswith(LARGE), checkpoint(webui)
        assert family_status(webui)["family"] == "sd3.5-large"
        after, _, _ = generate(webui)
        assert np.array_equal(before, after), "the previous model changed after the refused load"


def test_token_counter_and_flow_samplers_work_on_sd35(webui):
    """Same text encoders, same flow maths: the counter answers alike and DDIM / DPM++ 2M stay finite."""
    prompt = {"prompt": "a kangaroo in an orange hoodie", "negative": "blurry"}
    on_sd3 = webui.sd3_route("POST", "/sd3/token-count", prompt)
    with back_to_sd3(webui):
        for name in (LARGE, MEDIUM):
            switch(webui, name)
            on_sd35 = webui.post("/sd3/token-count", prompt)
            assert on_sd35.status_code == 200 and on_sd35.json() == on_sd3.json(), on_sd35.text
            for sampler in ("DDIM", "DPM++ 2M"):
                generate(webui, sampler_name=sampler)


# --- SLG, presets and MixDQ on SD3.5 ------------------------------------------------------------

MEDIUM_SLG_LAYER = 0
"""sd35-medium-tiny has joint blocks 0..1 and block 0 is its MMDiT-X block: skipping it shows SLG reaches
our rebuilt MMDiT's dual-attention block (Stability's 7,8,9 need the real 24-block model)."""
STEPS = 6


def _slg(layers: str) -> dict:
    return {"slg": "on", "slg_layers": layers, "slg_scale": 2.5, "slg_start": 0.0, "slg_end": 1.0}


def _args(**values) -> dict:
    return {"alwayson_scripts": {"SD3": {"args": [values]}}}


def _post_txt2img(webui, payload: dict) -> tuple[np.ndarray, str, str]:
    """POST a full txt2img payload; return (image, infotext line, log slice)."""
    mark = webui.mark()
    response = webui.post("/sdapi/v1/txt2img", payload)
    log = webui.log_since(mark)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:2000]}\n{log[-3000:]}"
    body = response.json()
    return decode_image(body["images"][0]), json.loads(body["info"])["infotexts"][0], log


def test_slg_on_sd35_medium_changes_the_image_and_pastes_back(webui):
    slg_text = f"SD3 SLG: layers {MEDIUM_SLG_LAYER}; scale 2.5; steps 0-1"
    with back_to_sd3(webui):
        switch(webui, MEDIUM)
        assert family_status(webui)["mmdit"] == "sd-webui-sd3"
        base, _, _ = generate(webui, steps=STEPS)
        guided, info, log = generate(webui, steps=STEPS, **_args(**_slg(str(MEDIUM_SLG_LAYER))))
        text = info["infotexts"][0]
        print(f"\n[{webui.state}] SD3.5 Medium SLG: {text!r}\n  max |guided - base| = {np.abs(guided - base).max():.1f}")
        assert slg_text in text and "SD3 family: SD3.5 Medium" in text, text
        assert not np.array_equal(base, guided), "SLG on gave the same image: the skipped block was not skipped"
        slg_status = webui.status()["features"].get("skip-layer guidance", {})
        assert slg_status.get("last_guided_steps") == list(range(1, STEPS)), slg_status

        # pasted back from the text alone (A1111's "infotext" API field, as the paste button)
        pasted, pasted_text, log = _post_txt2img(webui, {"infotext": text})
        assert not tracebacks_in(log), tracebacks_in(log)
        assert slg_text in pasted_text, pasted_text
        assert np.array_equal(pasted, guided), "the pasted infotext gave another image"

        # a layer the 2-block model lacks is refused before generating, naming the model's range
        response = webui.post("/sdapi/v1/txt2img", dict(_tiny(), **_args(**_slg("2"))))
        assert response.status_code == 422 and "0..1" in response.text, response.text


def test_presets_follow_the_loaded_sd35_family(webui):
    if webui.get("/sd3/presets").status_code != 200:
        pytest.skip("no presets in this build")
    with back_to_sd3(webui):
        for name in (LARGE, MEDIUM):
            switch(webui, name)
            body = webui.get("/sd3/presets").json()
            assert body["loaded_family"] == FAMILY[name][0], (name, body["loaded_family"])
        # MEDIUM is loaded: apply its preset's request fields as a client would, with SLG layers the tiny
        # model has (the preset's 7,8,9 are for the 24-block model) -- steps, CFG, sampler, scheduler as given
        preset = body["presets"][body["loaded_family"]]
        fields = json.loads(json.dumps(preset["txt2img"]))
        slg_args = fields["alwayson_scripts"]["SD3"]["args"][0]
        assert slg_args["slg"] == "on" and slg_args["slg_layers"] == [7, 8, 9], slg_args
        slg_args["slg_layers"] = [MEDIUM_SLG_LAYER]
        image, info, log = generate(webui, **fields)
        text = info["infotexts"][0]
        print(f"\n[{webui.state}] SD3.5 Medium preset -> {text!r}")
        for part in (f"Steps: {preset['steps']}", f"Sampler: {preset['sampler']}", f"CFG scale: {preset['cfg_scale']:g}",
                     f"SD3 SLG: layers {MEDIUM_SLG_LAYER}; scale {preset['slg']['scale']:g}; "
                     f"steps {preset['slg']['start']:g}-{preset['slg']['end']:g}"):
            assert part in text, (part, text)
        # the preset's window (1 %-20 % of 50 steps) is steps 1..9, counted as the reference counts them
        guided = webui.status()["features"]["skip-layer guidance"]["last_guided_steps"]
        steps, start, end = preset["steps"], preset["slg"]["start"], preset["slg"]["end"]
        assert guided == [s for s in range(steps) if start * steps < s < end * steps], guided


def _mixdq_on(webui) -> dict:
    """``GET /sd3/mixdq`` after a w8a8 generation (the session's ``--sd3-mixdq`` file may rename it "tiny-w8a8")."""
    body = webui.get("/sd3/mixdq").json()
    assert body["active"] and body["config"].endswith("w8a8"), body
    return body


def test_mixdq_w8a8_on_sd35_medium_quantizes_attn2_and_stays_close(webui):
    """w8a8 on SD3.5 Medium: the MMDiT-X blocks' ``attn2.qkv`` / ``attn2.proj`` are quantized too (two more
    layers per MMDiT-X block than SD3 Medium of the same depth), and the image stays close to the float one."""
    if webui.get("/sd3/mixdq").status_code != 200:
        pytest.skip("no MixDQ in this build")
    from test_real_mixdq import W8A8_MIN_PSNR_DB
    from webui_support import psnr

    with back_to_sd3(webui):
        generate(webui, **_mixdq("w8a8"))  # on SD3 Medium (sd3-tiny, depth 2, no MMDiT-X)
        sd3_layers = _mixdq_on(webui)["layers"]
        generate(webui, **_mixdq("off"))
        switch(webui, MEDIUM)
        status = family_status(webui)
        assert status["depth"] == 2 and status["mmdit_x_layers"], status
        base, _, _ = generate(webui, **_mixdq("off"))
        quant, info, _ = generate(webui, **_mixdq("w8a8"))
        on = _mixdq_on(webui)
        medium_layers = on["layers"]
        back, _, _ = generate(webui, **_mixdq("off"))
        print(f"\n[{webui.state}] w8a8 layers: SD3 {sd3_layers}, SD3.5 Medium {medium_layers}; "
              f"PSNR {psnr(base, quant):.1f} dB")
        assert medium_layers == sd3_layers + 2 * len(status["mmdit_x_layers"]), (sd3_layers, medium_layers)
        assert f"SD3 MixDQ: {on['config']}" in info["infotexts"][0], info["infotexts"][0]
        assert not np.array_equal(base, quant), "W8A8 image is bit-identical: nothing was quantized"
        assert psnr(base, quant) >= W8A8_MIN_PSNR_DB
        assert np.array_equal(base, back), "turning MixDQ off did not restore SD3.5 Medium exactly"
