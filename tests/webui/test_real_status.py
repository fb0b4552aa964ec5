"""Skeleton case: the extension loads inside a real A1111, reports its status, and shows its accordion."""

from __future__ import annotations

from webui_support import browser_page

from lib_sd3.webui.capabilities import STATE_DEV, STATE_EARLY


def test_status_route(webui):
    """GET /sd3/status answers with the state it detected and an SD3 model loaded."""
    status = webui.status()
    caps = status["capabilities"]
    assert caps["model_is_sd3"] is True, status
    expected = {"dev": STATE_DEV, "early": STATE_EARLY}[webui.state]
    assert caps["a1111_state"] == expected, f"{webui.state} detected as {caps['a1111_state']!r}"
    assert status["features"].get("startup", {}).get("failed_features") == {}, status
    for name, patch in status["patches"].items():
        assert patch["state"] != "failed", f"patch {name} failed on {webui.state}: {patch}"


def test_an_extension_loaded_after_ours_sees_the_first_model_load(webui):
    """Start-up never loads the model inside script loading (reading ``shared.sd_model`` would): the
    test-support extension, imported after sd-webui-sd3, sees no model yet at import and the first load
    through its own ``on_model_loaded``."""
    log = webui.log_path.read_text(errors="replace")
    assert 0 <= log.find("sd-webui-sd3 ready") < log.find("[sd3-test-support]"), "support extension loaded first"
    loads = webui.get("/sd3-test/model-loads").json()
    assert loads["loaded_before_this_script"] == "False", loads
    assert loads["seen"] and loads["seen"][0].startswith("sd3-tiny"), loads


def test_accordion_in_ui(webui):
    """The real page (headless Chromium) shows the SD3 accordion in txt2img, and it opens."""
    with browser_page(webui) as page:
        accordion = page.locator("#sd3_accordion_txt2img")
        accordion.wait_for(state="visible")
        assert "SD3" in accordion.inner_text()
        accordion.locator(".label-wrap").first.click()
        page.wait_for_timeout(500)
        assert accordion.locator("select, input, .wrap").count() > 0
