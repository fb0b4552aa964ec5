"""The real ControlNet extension's unit driving our SD3 ControlNet in a real A1111, opt-in.

``SD3_TEST_CONTROLNET`` names a checkout of Mikubill/sd-webui-controlnet (tested at its last commit, 56cec5b) whose
requirements are in A1111's venv. Each state gets its own server with that checkout copied into ``extensions/``
(it writes annotator downloads into its own folder). Without us, an SD3 model and an enabled unit gave an
``AssertionError`` (``sd_version != UNKNOWN``) in the console and an image identical to no unit. Here the unit goes
through our ControlNet: the tiny SD3.5-Large-shaped base with the tiny ControlNets in ``models/ControlNet``
(tests/webui/build_assets.py), selected in the extension's own model list (``GET /controlnet/model_list``).

The depth case runs the extension's ``depth_midas`` preprocessor on random DPT-Hybrid weights (built once in
A1111's venv with the extension's own MiDaS classes, ~0.5 GB in ``WEBUI_SD3_CACHE``, linked where the
extension looks for its annotator): nothing is downloaded, and what is checked is that the depth path runs,
not what the map looks like.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from webui_support import TINY, decode_image, find_feature, real_controlnet_params, tracebacks_in, txt2img

pytestmark = pytest.mark.parametrize("webui", real_controlnet_params(), indirect=True)

FOLDER = "sd-webui-controlnet"
ASSERTION = "sd_version != StableDiffusionVersion.UNKNOWN"
OUR_ENTRY = "SD3 ControlNet extension unit 0"
"""Our ControlNet core's infotext entry for the extension's first unit (its panel counts from 0)."""
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"
BUILD_MIDAS = r"""
import sys, types, torch
from pathlib import Path
out = Path(sys.argv[1])
shared = types.SimpleNamespace(opts=types.SimpleNamespace(data={"control_net_modules_path": str(out.parent)}),
                               cmd_opts=types.SimpleNamespace(), data_path=str(out.parent))
devices = types.SimpleNamespace(get_device_for=lambda name: torch.device("cpu"))
modules = types.ModuleType("modules")
modules.shared, modules.devices = shared, devices
sys.modules.update({"modules": modules, "modules.shared": shared, "modules.devices": devices})
sys.path.insert(0, ".")
from annotator.midas.midas.dpt_depth import DPTDepthModel
torch.manual_seed(0)
model = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
torch.save(model.state_dict(), str(out) + ".partial", _use_new_zipfile_serialization=False)  # A1111's safe
# unpickler refuses the zip format's ".format_version" entry
Path(str(out) + ".partial").rename(out)
"""


def png_b64(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def control_image() -> str:
    """A bright square on black: edges for canny, a near object for depth."""
    array = np.zeros((64, 64, 3), np.uint8)
    array[16:48, 20:44] = 230
    return png_b64(array)


def model_names(webui) -> dict[str, str]:
    """The extension's model list ("name [hash]"), by kind: blur / canny / depth / broken."""
    response = webui.get("/controlnet/model_list")
    assert response.status_code == 200, response.text[:500]
    names = response.json()["model_list"]
    found = {kind: next((n for n in names if f"controlnet_{kind}" in n), None) for kind in ("blur", "canny", "depth",
                                                                                             "broken")}
    assert all(found.values()), f"tiny ControlNets missing from the extension's list: {names}"
    return found


def unit(webui, kind: str = "canny", **fields) -> dict:
    return {"enabled": True, "module": kind, "model": model_names(webui)[kind], "image": control_image(),
            "weight": 1.0, "resize_mode": "Just Resize", "processor_res": 64, "threshold_a": 100, "threshold_b": 200,
            "guidance_start": 0.0, "guidance_end": 1.0, **fields}


def with_units(*units: dict) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


SD3, LARGE = "sd3-tiny.safetensors", "sd35-large-tiny.safetensors"
"""The tiny ControlNets are SD3.5 Large ControlNets: the cases that run them switch to the Large-shaped base."""


def select(webui, checkpoint: str) -> None:
    response = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint})
    assert response.status_code == 200, response.text[:1000]


@pytest.fixture
def large(webui):
    """Our ControlNet core present (else skip), the SD3.5-Large-shaped base loaded; SD3 Medium again after."""
    webui.sd3_route("GET", "/sd3/controlnet")  # skips while our ControlNet core is not in this build
    select(webui, LARGE)
    try:
        yield
    finally:
        select(webui, SD3)


def assert_clean(log: str) -> None:
    assert ASSERTION not in log and "AssertionError" not in log, log[-4000:]
    assert not tracebacks_in(log), "\n\n".join(tracebacks_in(log))


def params_of(info: dict) -> dict:
    return info.get("extra_generation_params", {})


def test_real_controlnet_extension_loads_and_is_wrapped(webui):
    log = webui.log_since(0)
    blocks = [b for b in tracebacks_in(log) if "controlnet" in b.lower() and "git repository" not in b.lower()]
    assert not blocks, "the ControlNet extension failed at start-up:\n" + "\n\n".join(blocks)
    status = webui.status()
    name = find_feature(status, "controlnetextension")
    assert name is not None, f"no ControlNet extension feature in /sd3/status: {sorted(status.get('features', {}))}"
    feature = status["features"][name]
    assert feature["patches"] == {"controlnet_extension.main_entry": "applied"}, feature
    assert feature["extension_found"] is True and feature["missing"] == [], feature
    model_names(webui)


def test_real_controlnet_unit_on_sd3_steps_aside(webui):
    """The extension's unit with SD3 loaded: HTTP 200, no assert, its own infotext entry kept."""
    _, info, log = txt2img(webui, sampler_name="Euler", **with_units(unit(webui)))
    assert_clean(log)
    assert "ControlNet 0" in params_of(info), params_of(info)


def test_real_controlnet_unit_drives_our_controlnet(webui, large):
    plain, _, _ = txt2img(webui, sampler_name="Euler")
    steered, info, log = txt2img(webui, sampler_name="Euler", **with_units(unit(webui)))
    assert_clean(log)
    entry = params_of(info).get(OUR_ENTRY)
    assert entry is not None and "canny" in entry, params_of(info)
    assert not np.array_equal(plain, steered), "the extension's unit did not change the image"


def test_real_controlnet_unit_weight_zero_is_none(webui, large):
    plain, _, _ = txt2img(webui, sampler_name="Euler")
    zero, _, log = txt2img(webui, sampler_name="Euler", **with_units(unit(webui, weight=0.0)))
    assert_clean(log)
    assert np.array_equal(plain, zero), "weight 0 must give the image without the unit, bit for bit"


def midas_weights(webui) -> None:
    """Random DPT-Hybrid weights where the copied extension looks for them (built once, cached)."""
    cache = Path(os.environ.get("WEBUI_SD3_CACHE", Path.home() / ".cache" / "sd-webui-sd3-tests"))
    built = cache / "controlnet-annotators" / "midas" / MIDAS_FILE
    extension = webui.data_dir / "extensions" / FOLDER
    if not built.exists():
        built.parent.mkdir(parents=True, exist_ok=True)
        python = os.environ.get("WEBUI_PYTHON" + ("" if webui.state == "dev" else "_EARLY")) or str(
            webui.root / "venv" / "bin" / "python")
        result = subprocess.run([python, "-c", BUILD_MIDAS, str(built)], cwd=extension, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    target = extension / "annotator" / "downloads" / "midas" / MIDAS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(built)


def test_real_controlnet_depth_preprocessor_runs(webui, large):
    midas_weights(webui)
    plain, _, _ = txt2img(webui, sampler_name="Euler")
    steered, info, log = txt2img(webui, sampler_name="Euler", **with_units(unit(webui, "depth", module="depth_midas")))
    assert_clean(log)
    entry = params_of(info).get(OUR_ENTRY)
    assert entry is not None and "depth" in entry, params_of(info)
    assert not np.array_equal(plain, steered)


def test_real_controlnet_truncated_file_is_one_line(webui, large):
    plain, _, _ = txt2img(webui, sampler_name="Euler")
    image, info, log = txt2img(webui, sampler_name="Euler", **with_units(unit(webui, "broken", module="none")))
    assert_clean(log)
    lines = [line for line in log.splitlines() if "truncated" in line]
    assert len(lines) == 1, log[-3000:]
    assert OUR_ENTRY not in params_of(info)
    assert np.array_equal(plain, image)


def img2img(webui, **overrides) -> tuple[np.ndarray, dict, str]:
    payload = dict(TINY, sampler_name="Euler", init_images=[control_image()], denoising_strength=0.6, **overrides)
    mark = webui.mark()
    response = webui.post("/sdapi/v1/img2img", payload)
    log = webui.log_since(mark)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:2000]}\n{log[-3000:]}"
    body = response.json()
    return decode_image(body["images"][0]), json.loads(body["info"]), log


def test_real_controlnet_img2img_unit_without_image_takes_the_init_image(webui, large):
    """The blur ControlNet's upscaling recipe from the extension's panel: no unit image, img2img's init image."""
    plain, _, _ = img2img(webui)
    steered, info, log = img2img(webui, **with_units(unit(webui, "blur", module="none", image=None)))
    assert_clean(log)
    entry = params_of(info).get(OUR_ENTRY)
    assert entry is not None and "blur" in entry, params_of(info)
    assert not np.array_equal(plain, steered)
