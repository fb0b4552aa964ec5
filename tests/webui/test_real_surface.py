"""The extension's user-facing surface in a real A1111: SLG, its infotext pasted back, bad API args, presets.

The test model is the depth-2 SD3 MMDiT, so SLG skips joint block 1 (Stability's 7,8,9 need SD3.5 Medium).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from webui_support import TINY, decode_image, tracebacks_in, txt2img

SLG = {"slg": "on", "slg_layers": "1", "slg_scale": 2.5, "slg_start": 0.0, "slg_end": 1.0}
SLG_TEXT = "SD3 SLG: layers 1; scale 2.5; steps 0-1"  # A1111 quotes a value only when it holds a comma
STEPS = 6


def _args(**values) -> dict:
    return {"alwayson_scripts": {"SD3": {"args": [values]}}}


def _infotext(info: dict) -> str:
    return info["infotexts"][0]


def _post(webui, payload: dict) -> tuple[dict, str]:
    mark = webui.mark()
    response = webui.post("/sdapi/v1/txt2img", payload)
    log = webui.log_since(mark)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:2000]}\n{log[-3000:]}"
    body = response.json()
    return body, log


def test_slg_changes_the_image_and_its_infotext_pastes_back(webui):
    base, base_info, _ = txt2img(webui, sampler_name="Euler", steps=STEPS)
    body, log = _post(webui, dict(TINY, sampler_name="Euler", steps=STEPS, **_args(**SLG)))
    guided, text = decode_image(body["images"][0]), _infotext(json.loads(body["info"]))
    print(f"\n[{webui.state}] SLG infotext: {text!r}\n  max |guided - base| = {np.abs(guided - base).max():.1f}")
    assert not tracebacks_in(log), tracebacks_in(log)
    assert "SD3 SLG" not in _infotext(base_info)
    assert SLG_TEXT in text, text
    assert not np.array_equal(base, guided), "SLG on gave the same image: the extra pass did nothing"
    status = webui.status()["features"].get("skip-layer guidance", {})
    assert status.get("last_guided_steps") == list(range(1, STEPS)), status  # 0 < step < 1.0 * steps

    # The PNG's parameters chunk, read back by A1111, holds the entry.
    parsed = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + body["images"][0]})
    assert parsed.status_code == 200, parsed.text
    assert SLG_TEXT in parsed.json()["info"], parsed.json()["info"]

    # The API's "infotext" field pastes a generation back the way the UI's paste button does (A1111 reads the
    # script's infotext_fields): no SD3 args and no other fields sent, everything comes from the text alone.
    pasted_body, log = _post(webui, {"infotext": text})
    assert not tracebacks_in(log), tracebacks_in(log)
    pasted_text = _infotext(json.loads(pasted_body["info"]))
    print(f"  pasted back -> {pasted_text!r}")
    assert SLG_TEXT in pasted_text, pasted_text
    assert np.array_equal(decode_image(pasted_body["images"][0]), guided), "the pasted infotext gave another image"


@pytest.mark.parametrize("args, words", [
    ([{"mixdq": "w9a9"}], ["mixdq", "w9a9", "allowed"]),
    ([{"flow_samplers": "banana"}], ["flow_samplers", "banana", "allowed"]),
    (["x", 5], ["flow_samplers", "allowed"]),
    ([{"no_such_key": "on"}], ["no_such_key", "known"]),
    ([{"slg": "on", "slg_layers": "7,8,9"}], ["slg_layers", "0..1"]),  # the loaded MMDiT has 2 joint blocks
])
def test_bad_sd3_args_are_422_before_any_generation(webui, args, words):
    mark = webui.mark()
    response = webui.post("/sdapi/v1/txt2img", dict(TINY, alwayson_scripts={"SD3": {"args": args}}))
    log = webui.log_since(mark)
    lines = [line for line in log.splitlines() if line.strip()]
    print(f"\n[{webui.state}] {args} -> HTTP {response.status_code} {response.text[:300]}\n  console: {lines}")
    assert response.status_code == 422, response.text
    detail = response.json().get("detail", "")
    for word in words:
        assert word in detail, detail
    assert len(lines) == 1 and detail in lines[0], lines  # one console line, no traceback, no progress bar


def test_presets_route(webui):
    response = webui.sd3_route("GET", "/sd3/presets")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["loaded_family"] == "sd3-medium", body["loaded_family"]
    assert set(body["presets"]) == {"sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"}
    medium = body["presets"]["sd3.5-medium"]["txt2img"]
    assert medium["alwayson_scripts"]["SD3"]["args"][0]["slg_layers"] == [7, 8, 9]
    # a preset's request fields are valid input as they are (here with SLG layers that the tiny model has)
    fields = dict(body["presets"]["sd3.5-large-turbo"]["txt2img"])
    image, info, log = txt2img(webui, **{**fields, "steps": 2})
    assert not tracebacks_in(log), tracebacks_in(log)
    assert "Sampler: Euler" in _infotext(info)


PASTED_TEXT = ("a cat\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, SD3 flow samplers: False, "
               "SD3 NaN guard: True, SD3 MixDQ: w8a8, SD3 SLG: \"layers 1; scale 3; steps 0.1-0.6\"")


def test_ui_paste_restores_the_accordion(webui):
    """The txt2img paste button (infotext in the prompt box) sets every SD3 choice, and none of them is
    offered again as an "Override settings" entry."""
    from webui_support import browser_page

    dropdowns = {"flow_samplers": "off", "nan_guard": "on", "mixdq": "w8a8", "slg": "on"}
    sliders = {"slg_scale": 3.0, "slg_start": 0.1, "slg_end": 0.6}
    with browser_page(webui) as page:
        page.locator("#txt2img_prompt textarea").fill(PASTED_TEXT)
        page.locator("#tab_txt2img #paste").click()
        page.wait_for_function("() => document.querySelector('#sd3_slg_txt2img input').value === 'on'")
        seen = {name: page.evaluate(f"() => document.querySelector('#sd3_{name}_txt2img input').value")
                for name in dropdowns}
        seen.update({name: float(page.evaluate(
            f"() => document.querySelector('#sd3_{name}_txt2img input[type=number]').value")) for name in sliders})
        layers = page.evaluate("() => [...document.querySelectorAll('#sd3_slg_layers_txt2img .token')]"
                               ".map(e => e.innerText.trim())")
        overrides = page.evaluate("() => document.querySelector('#txt2img_override_settings')?.innerText || ''")
    print(f"\n[{webui.state}] pasted -> {seen}, layers {layers}; override settings: {overrides!r}")
    assert seen == {**dropdowns, **sliders}
    assert [layer.strip("×✕ \n") for layer in layers] == ["1"], layers
    assert "SD3" not in overrides, overrides


@pytest.mark.parametrize("fields, words", [
    ({"alwayson_scripts": {"SD3": {"args": None}}}, ["must be a list"]),  # A1111 alone: HTTP 500, a TypeError
    ({"alwayson_scripts": {"SD3": None}}, ["alwayson_scripts SD3"]),  # A1111 alone: HTTP 500
    ({"alwayson_scripts": {"SD3": [{"mixdq": "w8a8"}]}}, ["alwayson_scripts SD3", "args"]),  # A1111 alone: ignored
    ({"alwayson_scripts": {"SD3": {"args": [{"mixdq": "w8a8"}, "on"]}}}, ["nothing after it"]),  # ignored too
    ({"override_settings": {"sd3_mixdq": "int4"}}, ["sd3_mixdq", "int4", "allowed"]),
    ({"override_settings": {"sd3_slg_layers": "abc"}}, ["sd3_slg_layers", "abc"]),
    ({"alwayson_scripts": {"SD3": {"args": [{"mixdq": "x" * 200_000}]}}}, ["mixdq", "200002 characters"]),
])
def test_every_way_a_value_arrives_is_checked_before_anything_runs(webui, fields, words):
    mark = webui.mark()
    response = webui.post("/sdapi/v1/txt2img", dict(TINY, **fields))
    log = webui.log_since(mark)
    lines = [line for line in log.splitlines() if line.strip()]
    print(f"\n[{webui.state}] {str(fields)[:120]} -> HTTP {response.status_code} {response.text[:200]}")
    assert response.status_code == 422, response.text[:2000]
    detail = response.json().get("detail", "")
    for word in words:
        assert word in detail, detail
    assert len(detail) < 400, "a bad value must be quoted short"
    assert len(lines) == 1 and detail in lines[0], lines  # one console line, no traceback, no progress bar


def test_a_pasted_infotext_naming_a_config_not_here_is_one_warning(webui):
    """``SD3 MixDQ: int4`` (an image made with a custom config elsewhere) through the API's ``infotext`` field:
    the image is made with the setting's MixDQ, one warning line, and the other SD3 entries are all there."""
    text = ("a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, SD3 flow samplers: True, "
            "SD3 NaN guard: True, SD3 MixDQ: int4")
    body, log = _post(webui, {"infotext": text})
    assert not tracebacks_in(log), tracebacks_in(log)
    warnings = [line for line in log.splitlines() if "int4" in line]
    assert len(warnings) == 1 and "setting" in warnings[0], warnings
    made = _infotext(json.loads(body["info"]))
    assert "SD3 flow samplers: True" in made and "SD3 NaN guard: True" in made and "SD3 family" in made, made
    assert "int4" not in made, made


def _pick(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f'#{elem_id} li[data-testid="dropdown-option"][data-value="{value}"]:visible').click()


def test_ui_words(webui):
    """The SLG layer list offers the loaded model's joint blocks (the tiny MMDiT: 0 and 1); "Download T5 now"
    is not shown while T5 is off (this server's setting); a preset of a family without SLG clears the layers."""
    from webui_support import browser_page

    layer_tokens = "() => [...document.querySelectorAll('#sd3_slg_layers_txt2img .token')].map(e => e.innerText)"
    with browser_page(webui) as page:
        page.locator("#sd3_accordion_txt2img .label-wrap").first.click()
        options_js = ("() => [...document.querySelectorAll('#sd3_slg_layers_txt2img "
                      "li[data-testid=\"dropdown-option\"]')].map(e => e.dataset.value)")
        page.locator("#sd3_slg_layers_txt2img input").click()  # the choices are read again when the field opens
        with contextlib.suppress(Exception):
            page.wait_for_function(f"() => ({options_js})().length === 2", timeout=20_000)
        offered = page.evaluate(options_js)
        page.locator('#sd3_slg_layers_txt2img li[data-testid="dropdown-option"][data-value="1"]').click()
        page.keyboard.press("Escape")
        page.wait_for_function(f"() => ({layer_tokens})().length === 1")
        fetch_visible = page.locator("#sd3_t5_fetch_txt2img").is_visible()
        status_width = page.evaluate("() => document.querySelector('#sd3_t5_status_txt2img').getBoundingClientRect().width")
        accordion_width = page.evaluate("() => document.querySelector('#sd3_accordion_txt2img').getBoundingClientRect().width")
        _pick(page, "sd3_preset_txt2img", "sd3.5-large-turbo")
        page.locator("#sd3_apply_preset_txt2img").click()
        page.wait_for_function(f"() => ({layer_tokens})().length === 0")
        slg = page.evaluate("() => document.querySelector('#sd3_slg_txt2img input').value")
    print(f"\n[{webui.state}] SLG layers offered {offered}; Download T5 shown: {fetch_visible}; "
          f"T5 status {status_width:.0f} of {accordion_width:.0f} px; after the turbo preset SLG {slg!r}")
    assert offered == ["0", "1"], offered
    assert not fetch_visible
    assert status_width > 0.8 * accordion_width, "the T5 status must not be squeezed beside the buttons"
    assert slg == "off"
