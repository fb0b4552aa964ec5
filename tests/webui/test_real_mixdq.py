"""MixDQ on the loaded SD3 MMDiT in a real A1111 (issue 6): via ``alwayson_scripts`` and ``/sd3/mixdq``.

W8A8 must give an image close to the unquantized one from the same seed; turning it off must give
the unquantized image back exactly (weights restored bit for bit, so the same seed is the same image).
"""

from __future__ import annotations

import numpy as np
from webui_support import TINY, browser_page, psnr, tracebacks_in, txt2img

W8A8_MIN_PSNR_DB = 25.0
"""8-bit weights and activations on a random 2-block MMDiT: differences of a few levels at most."""


def _mixdq(value: str) -> dict:
    return {"alwayson_scripts": {"SD3": {"args": [{"mixdq": value}]}}}


def test_mixdq_via_alwayson_scripts(webui):
    webui.sd3_route("GET", "/sd3/mixdq")
    base, _, _ = txt2img(webui, sampler_name="Euler", **_mixdq("off"))
    quant, info, log = txt2img(webui, sampler_name="Euler", **_mixdq("w8a8"))
    back, _, log_back = txt2img(webui, sampler_name="Euler", **_mixdq("off"))
    print(f"\n[{webui.state}] alwayson W8A8 PSNR {psnr(base, quant):.1f} dB; off again: PSNR {psnr(base, back):.1f} dB")
    assert not tracebacks_in(log + log_back), tracebacks_in(log + log_back)
    assert "w8a8" in str(info).lower(), f"infotext does not record the MixDQ config: {info}"
    assert not np.array_equal(base, quant), "W8A8 image is bit-identical: nothing was quantized"
    assert psnr(base, quant) >= W8A8_MIN_PSNR_DB
    assert np.array_equal(base, back), "turning MixDQ off did not restore the original image"


def test_mixdq_route_toggle(webui):
    response = webui.sd3_route("GET", "/sd3/mixdq")
    assert response.status_code == 200, response.text
    base, _, _ = txt2img(webui, sampler_name="Euler")
    on = webui.post("/sd3/mixdq", {"config": "w8a8"})
    assert on.status_code == 200, on.text
    quant, _, _ = txt2img(webui, sampler_name="Euler")
    off = webui.post("/sd3/mixdq", {"config": "off"})
    assert off.status_code == 200, off.text
    back, _, log = txt2img(webui, sampler_name="Euler")
    print(f"\n[{webui.state}] /sd3/mixdq on -> {on.json()}\n  off -> {off.json()}\n"
          f"  PSNR on {psnr(base, quant):.1f} dB, off {psnr(base, back):.1f} dB")
    assert not tracebacks_in(log), tracebacks_in(log)
    assert psnr(base, quant) >= W8A8_MIN_PSNR_DB and not np.array_equal(base, quant)
    assert np.array_equal(base, back)
    bad = webui.post("/sd3/mixdq", {"config": "no-such-config"})
    assert 400 <= bad.status_code < 500, f"a bad config should be a client error, got {bad.status_code}: {bad.text}"


def _ui_pick(page, elem_id: str, value: str) -> None:
    """Gradio 3.41 dropdown: click its input, then the option with that value in the list that opens."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f'li[data-testid="dropdown-option"][data-value="{value}"]:visible').click()
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`).value === v", arg=[elem_id, value])


INFO_JS = "() => [...new Set([...document.querySelectorAll('#html_info_txt2img')].map(e => e.innerText || ''))].join('\\n')"
"""Gradio 3.41 gives both the block and its inner div the id ``html_info_txt2img``: read them all."""


def _ui_generate(page) -> str:
    """Click Generate and return the generation info A1111 then shows under the image."""
    before = page.evaluate(INFO_JS)
    page.locator("#txt2img_generate").click()
    page.wait_for_function(f"b => {{ const t = ({INFO_JS})(); return t !== b && t.includes('Steps:'); }}",
                           arg=before, timeout=300_000)
    page.wait_for_selector("#txt2img_gallery img", state="visible")
    return page.evaluate(INFO_JS)


def test_mixdq_ui_toggle(webui):
    """The SD3 accordion's MixDQ dropdown quantizes from the real txt2img page, and "off" restores the MMDiT.

    The session runs with ``--sd3-mixdq <tiny-w8a8.yaml>``, so the shipped choice "w8a8" means the config
    cut down to the tiny MMDiT (conftest.tiny_mixdq_config); its name is what the infotext records.
    """
    assert webui.sd3_route("GET", "/sd3/mixdq").json()["active"] is False, "a case left MixDQ on"
    with browser_page(webui) as page:
        mark = webui.mark()
        page.locator("#txt2img_prompt textarea").fill(TINY["prompt"])
        for name in ("width", "height", "steps"):
            page.locator(f"#txt2img_{name} input[type=number]").fill(str(TINY[name]))
        page.locator("#sd3_accordion_txt2img .label-wrap").first.click()
        _ui_pick(page, "sd3_mixdq_txt2img", "w8a8")
        on_info = _ui_generate(page)
        on = webui.sd3_route("GET", "/sd3/mixdq").json()
        _ui_pick(page, "sd3_mixdq_txt2img", "off")
        off_info = _ui_generate(page)
        off = webui.sd3_route("GET", "/sd3/mixdq").json()
        log = webui.log_since(mark)
    print(f"\n[{webui.state}] UI w8a8 -> {on_info!r}\n  /sd3/mixdq {on}\n  UI off -> {off_info!r}\n  /sd3/mixdq {off}")
    assert not tracebacks_in(log), tracebacks_in(log)
    assert "SD3 MixDQ: tiny-w8a8" in on_info, f"the shown generation info lacks the MixDQ entry: {on_info!r}"
    assert on["active"] is True and on["config"] == "tiny-w8a8", on
    assert "SD3 MixDQ" not in off_info, f"MixDQ off still recorded in the infotext: {off_info!r}"
    assert off["active"] is False, off
