"""javascript/sd3_token_counter.js in headless Chromium (Debian ``chromium``; skipped without it).

The page has A1111's counter elements (``#txt2img_token_counter`` ... as gr.HTML blocks with the
``token-counter`` class) and tiny stand-ins for the A1111 page hooks our script uses
(``gradioApp``, ``onUiLoaded``, ``onAfterUiUpdate``). Each update writes what A1111's
``ui.update_token_counter`` returns, built here from the adapter's real ``CounterTarget``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lib_sd3 import tokens as lib
from lib_sd3.webui.tokens import CounterTarget

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
.block.token-counter span { border: 2px solid rgba(192, 192, 192, 0.4); }
</style><script>
var uiLoadedCallbacks = [], uiAfterUpdateCallbacks = [];
function gradioApp() { return document; }
function onUiLoaded(f) { uiLoadedCallbacks.push(f); }
function onAfterUiUpdate(f) { uiAfterUpdateCallbacks.push(f); }
</script></head><body><gradio-app>
<div id="txt2img_prompt"><label><textarea></textarea></label></div>
<div id="txt2img_token_counter" class="block token-counter token-counter-visible"><div class="prose"><span>0/75</span></div></div>
<div id="txt2img_neg_prompt"><label><textarea></textarea></label></div>
<div id="txt2img_negative_token_counter" class="block token-counter token-counter-visible"><div class="prose"><span>0/75</span></div></div>
</gradio-app></body></html>"""


def a1111_response(clip: int, target: int, summary: lib.PromptCount | None) -> str:
    """What ui.update_token_counter returns: f"<span class='gr-box gr-text-input'>{count}/{max_length}</span>"."""
    max_length = CounterTarget(target, summary) if summary is not None else target
    return f"<span class='gr-box gr-text-input'>{clip}/{max_length}</span>"


@pytest.fixture(scope="module")
def page():
    if CHROMIUM is None:
        pytest.skip("Debian chromium not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.set_content(PAGE)
        page.add_style_tag(content=(ROOT / "style.css").read_text(encoding="utf-8"))
        page.add_script_tag(content=(ROOT / "javascript" / "sd3_token_counter.js").read_text(encoding="utf-8"))
        page.evaluate("uiLoadedCallbacks.forEach(f => f())")
        page.requests = requests
        yield page
        browser.close()


def show(page, counter_id: str, response: str) -> dict:
    """Gradio replaces the HTML block's content; then read what the user sees."""
    page.evaluate("([id, html]) => { document.querySelector('#' + id + ' .prose').innerHTML = html; }",
                  [counter_id, response])
    page.wait_for_function("id => !document.querySelector('#' + id + ' .sd3-tokens')", arg=counter_id)
    return page.evaluate("""id => {
        const counter = document.getElementById(id), box = counter.querySelector('span');
        const t5 = box.querySelector('.sd3-t5');
        return {text: counter.innerText.trim(), warn: counter.classList.contains('sd3-token-warning'),
                title: box.title, border: getComputedStyle(box).borderTopColor,
                t5_opacity: t5 ? Number(getComputedStyle(t5).opacity) : null,
                t5_border: t5 ? getComputedStyle(t5).borderTopWidth : null};
    }""", counter_id)


def test_sd3_counts_shown(page):
    summary = lib.PromptCount(clip=23, clip_target=75, clip_limit=None, t5=31, t5_limit=77, t5_enabled=True)
    seen = show(page, "txt2img_token_counter", a1111_response(23, 75, summary))
    assert seen["text"] == "23/75 · T5 31/77"
    assert not seen["warn"] and seen["border"] == "rgba(192, 192, 192, 0.4)"
    assert "T5: 31 tokens; this A1111 keeps 77" in seen["title"]


def test_truncated_t5_warns_with_reason(page):
    summary = lib.PromptCount(clip=60, clip_target=75, clip_limit=None, t5=120, t5_limit=77, t5_enabled=True)
    seen = show(page, "txt2img_token_counter", a1111_response(60, 75, summary))
    assert seen["text"] == "60/75 · T5 120/77"
    assert seen["warn"] and seen["border"] == "rgba(255, 165, 0, 0.8)"
    assert "T5 truncated: 120 tokens" in seen["title"] and "the last 43 are not seen" in seen["title"]


def test_disabled_t5_is_dimmed_and_negative_counter_is_separate(page):
    summary = lib.PromptCount(clip=4, clip_target=75, clip_limit=None, t5=6, t5_limit=77, t5_enabled=False)
    seen = show(page, "txt2img_negative_token_counter", a1111_response(4, 75, summary))
    assert seen["text"] == "4/75 · T5 6/77" and not seen["warn"] and "T5 disabled" in seen["title"]
    assert seen["t5_opacity"] < 1 and seen["border"] == "rgba(192, 192, 192, 0.4)"
    positive = page.evaluate("document.getElementById('txt2img_token_counter').innerText.trim()")
    assert positive != seen["text"]


def test_disabled_t5_past_its_limit_is_dimmed_not_a_warning(page):
    """T5 off: a T5 count past the CLIP length cuts nothing, since T5 is not encoded at all."""
    summary = lib.PromptCount(clip=84, clip_target=150, clip_limit=None, t5=187, t5_limit=154, t5_enabled=False)
    seen = show(page, "txt2img_token_counter", a1111_response(84, 150, summary))
    assert seen["text"] == "84/150 · T5 187/154"
    assert not seen["warn"] and seen["border"] == "rgba(192, 192, 192, 0.4)"
    assert seen["t5_opacity"] < 1 and seen["t5_border"] == "0px"
    assert "T5 disabled" in seen["title"] and "truncated" not in seen["title"]
    summary = lib.PromptCount(clip=84, clip_target=150, clip_limit=None, t5=187, t5_limit=154, t5_enabled=True)
    seen = show(page, "txt2img_token_counter", a1111_response(84, 150, summary))  # switched on: a warning
    assert seen["warn"] and seen["t5_opacity"] == 1 and "T5 truncated" in seen["title"]


def test_early_branch_has_no_t5_limit(page):
    summary = lib.PromptCount(clip=80, clip_target=75, clip_limit=75, t5=95, t5_limit=None, t5_enabled=True,
                              state=lib.STATE_EARLY)
    seen = show(page, "txt2img_token_counter", a1111_response(80, 75, summary))
    assert seen["text"] == "80/75 · T5 95"
    assert seen["warn"] and "fails on longer prompts" in seen["title"] and "no limit" in seen["title"]


def test_other_models_show_a1111s_counter(page):
    summary = lib.PromptCount(clip=60, clip_target=75, clip_limit=None, t5=120, t5_limit=77, t5_enabled=True)
    show(page, "txt2img_token_counter", a1111_response(60, 75, summary))
    page.evaluate("document.querySelector('#txt2img_token_counter .prose').innerHTML = "
                  "\"<span class='gr-box gr-text-input'>42/75</span>\"")
    page.wait_for_function("!document.getElementById('txt2img_token_counter').classList.contains('sd3-token-warning')")
    assert page.evaluate("document.getElementById('txt2img_token_counter').innerText.trim()") == "42/75"


def test_no_requests_of_our_own(page):
    assert [url for url in page.requests if not url.startswith(("about:", "data:"))] == []
