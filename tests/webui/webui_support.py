"""Helpers shared by the real-WebUI cases and their fixture: server-log errors, API images, a headless browser."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

STATES = {"dev": "WEBUI_ROOT", "early": "WEBUI_ROOT_EARLY"}
"""State name -> environment variable naming its A1111 checkout."""
REAL_ICLIGHT = {"iclight-old": "SD3_TEST_ICLIGHT_OLD", "iclight-new": "SD3_TEST_ICLIGHT_NEW"}
"""Variant -> variable naming a checkout of huchenlei/sd-forge-ic-light (old: 8c2963e, new: ff82902)."""
MODEL_PATCHER_VAR = "SD3_TEST_MODEL_PATCHER"
"""Names a checkout of huchenlei/sd-webui-model-patcher, which IC-Light's A1111 backend imports."""
CONTROLNET_VAR = "SD3_TEST_CONTROLNET"
"""Names a checkout of Mikubill/sd-webui-controlnet (tested at 56cec5b) with its requirements in A1111's venv."""


def configured_states() -> list[str]:
    return [state for state, var in STATES.items() if os.environ.get(var)]


def real_iclight_params() -> list[str]:
    """``webui`` params for the real-IC-Light cases: one ``"<state>:<variant>"`` per state and variant."""
    return [f"{state}:{variant}" for state in configured_states() or ["unset"] for variant in REAL_ICLIGHT]


def real_controlnet_params() -> list[str]:
    """``webui`` params for the real-ControlNet-extension cases: ``"<state>:controlnet"`` per state."""
    return [f"{state}:controlnet" for state in configured_states() or ["unset"]]

T5_REPO = "AUTOMATIC/stable-diffusion-3-medium-text-encoders"
T5_FILE = "t5xxl_fp16.safetensors"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Without the background-networking flags Chromium floods this closed network with refused connections."""

TINY = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0, "seed": 1234, "prompt": "a cat", "negative_prompt": ""}
"""A 64x64 txt2img: a 4x4 patch grid on the depth-2 MMDiT; CLIP-G's encode dominates the first call."""


def decode_image(b64: str) -> np.ndarray:
    """An API image as float pixels in [0, 255], shape (H, W, C)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def txt2img(webui, **overrides) -> tuple[np.ndarray, dict, str]:
    """Run a tiny txt2img; return (image, infotext dict, log slice); fail with the server's words on an error."""
    payload = dict(TINY, **overrides)
    mark = webui.mark()
    response = webui.post("/sdapi/v1/txt2img", payload)
    log = webui.log_since(mark)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:2000]}\n--- server log ---\n{log[-3000:]}"
    body = response.json()
    info = json.loads(body["info"]) if isinstance(body.get("info"), str) else body.get("info", {})
    return decode_image(body["images"][0]), info, log


def find_feature(status: dict, *words: str) -> str | None:
    """The name of the /sd3/status feature whose letters contain one of ``words`` ("IC-Light shim" ~ "iclight")."""
    for name in status.get("features", {}):
        letters = "".join(ch for ch in name.lower() if ch.isalnum())
        if any(word in letters for word in words):
            return name
    return None


@contextlib.contextmanager
def browser_page(webui):
    """A headless Debian Chromium page on the WebUI, driven by Playwright; skips when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing: apt-get install chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(webui.url + "/", wait_until="domcontentloaded")
            page.wait_for_selector("#txt2img_prompt textarea", state="visible", timeout=120_000)
            yield page
        finally:
            browser.close()


FAKE_ICLIGHT_MARK = "sd3-test-iclight"
"""Folder prefix of the fake IC-Light extensions; their errors belong to the IC-Light cases only."""
FAKE_ICLIGHT = Path(__file__).resolve().parent.parent / "a1111" / "iclight"
FAKE_ICLIGHT_EXTENSIONS = {"sd3-test-iclight-a-new": "new_ff82902", "sd3-test-iclight-b-old": "old_8c2963e"}
"""Extension folder -> shape in tests/a1111/iclight. "new" sorts before "old": the API's
``alwayson_scripts {"IC Light": ...}`` reaches the first one."""


def install_fake_iclight(extensions: Path) -> None:
    """The unit suite's fake IC-Light pair as two A1111 extensions: each shape's ``scripts/``, ``libiclight/`` beside."""
    for folder, shape in FAKE_ICLIGHT_EXTENSIONS.items():
        shutil.copytree(FAKE_ICLIGHT / shape / "scripts", extensions / folder / "scripts")
        shutil.copytree(FAKE_ICLIGHT / "libiclight", extensions / folder / "libiclight")


def _error_blocks(text: str) -> list[str]:
    """A1111's ``*** message`` + indented traceback + ``---`` blocks, and bare Python tracebacks."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*** ") or line.startswith("Traceback (most recent call last)"):
            if current:
                blocks.append("\n".join(current))
            current = [line]
        elif current is not None:
            if line.startswith((" ", "\t")):
                current.append(line)
                continue
            if current[0].startswith("Traceback") and line.strip() != "---":
                current.append(line)  # the exception line ends a bare traceback
            blocks.append("\n".join(current))
            current = None
    if current:
        blocks.append("\n".join(current))
    return blocks


def tracebacks_in(text: str, include_fakes: bool = False) -> list[str]:
    """Error blocks in a server-log slice; the fake IC-Light's own errors only when asked for."""
    return [b for b in _error_blocks(text) if include_fakes or FAKE_ICLIGHT_MARK not in b]
