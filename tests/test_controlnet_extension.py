"""The ControlNet extension's panel driving our SD3 ControlNet, against a fake of the extension at 56cec5b
(tests/a1111/controlnet_56cec5b) in an A1111-like script runner.

The fake reproduces the report first: on SD3 every enabled unit stops at the extension's assert. Then, with
the bridge: on SD3 the extension hooks nothing and asserts nothing, its units come out as our requests (image,
its preprocessor's map, weight, start / end, resize mode, file); on SD1.5 / SDXL it runs exactly as without us.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from a1111 import models, processing
from a1111 import scripts as fake_scripts
from feature_registration import registered
from PIL import Image
from safetensors.torch import save_file

from lib_sd3 import LOGGER_NAME
from lib_sd3.controlnet.preprocess import ResizeMode
from lib_sd3.patching import PatchState
from lib_sd3.webui import controlnet_extension as bridge
from lib_sd3.webui.registry import REGISTRY

registered(bridge)

EXTENSION_DIR = Path(__file__).parent / "a1111" / "controlnet_56cec5b"
SCRIPT_FILE = "extensions/sd-webui-controlnet/scripts/controlnet.py"
PACKAGES = ("scripts", "internal_controlnet")  # the extension's own, as it imports them
UNITS = 3


def write_sd3_controlnet(path: Path, control_type: int = 1, hidden: int = 64) -> Path:
    """A header-true SD3.5 ControlNet in Stability's layout (tiny tensors: only the header is read here)."""
    shapes = {"pos_embed_input.proj.weight": (hidden, 16, 2, 2), "pos_embed_input.proj.bias": (hidden,),
              "time_text_embed.text_embedder.linear_1.weight": (hidden, 32),
              "transformer_blocks.0.attn.qkv.weight": (3 * hidden, hidden), "controlnet_blocks.0.weight": (hidden, hidden)}
    state = {key: torch.zeros(shape) for key, shape in shapes.items()}
    state["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    save_file(state, str(path))
    return path


@pytest.fixture
def webui(fake_webui, monkeypatch):
    fake_scripts.ERRORS.reported.clear()
    fake_webui.module("modules.errors", report=fake_scripts.ERRORS.report)
    fake_webui.module("modules.scripts", Script=fake_scripts.Script, ScriptRunner=fake_scripts.ScriptRunner,
                      AlwaysVisible=fake_scripts.AlwaysVisible, PostSampleArgs=fake_scripts.PostSampleArgs,
                      PostprocessImageArgs=fake_scripts.PostprocessImageArgs, scripts_txt2img=None, scripts_img2img=None)
    for package in PACKAGES:
        fake_webui.drop_on_close(package)
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            monkeypatch.delitem(sys.modules, name)
    yield fake_webui
    REGISTRY.undo(bridge.PATCH_NAME)


@pytest.fixture
def files(tmp_path):
    sd15 = tmp_path / "control_v11p_sd15_canny.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4)}, str(sd15))
    truncated = write_sd3_controlnet(tmp_path / "sd3.5_large_controlnet_blur_cut.safetensors", 0)
    truncated.write_bytes(truncated.read_bytes()[:-64])
    return {"canny": write_sd3_controlnet(tmp_path / "sd3.5_large_controlnet_canny.safetensors", 1),
            "depth": write_sd3_controlnet(tmp_path / "sd3.5_large_controlnet_depth.safetensors", 2),
            "sd15": sd15, "truncated": truncated}


class Extension:
    """The fake extension loaded into a txt2img runner as A1111 does it, its models listed."""

    def __init__(self, webui, files):
        self.module = fake_scripts.load_script_module(str(EXTENSION_DIR / "scripts" / "controlnet.py"),
                                                      str(EXTENSION_DIR))
        self.global_state = sys.modules["scripts.global_state"]
        self.preprocessors = sys.modules["scripts.supported_preprocessor"].Preprocessor
        self.models = {kind: self.global_state.add_model(path, f"{i:08x}") for i, (kind, path) in
                       enumerate(files.items())}
        self.runner = fake_scripts.ScriptRunner()
        self.script = self.module.Script()
        self.runner.add(self.script, [{"enabled": False}] * UNITS, SCRIPT_FILE)
        webui.module("modules.scripts", scripts_txt2img=self.runner)
        self.webui = webui

    def unit(self, **fields):
        image = np.zeros((48, 64, 3), np.uint8)
        image[:, 32:] = 200
        return {"enabled": True, "module": "canny", "model": self.models["canny"], "image": image, **fields}

    def p(self, family: str, *units, img2img: bool = False, **fields):
        model = models.Model(family, diffusion_model=types.SimpleNamespace())
        self.webui.shared.sd_model = model
        args = self.runner.script_args(ControlNet=list(units) + [{"enabled": False}] * (UNITS - len(units)))
        kind = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
        p = kind(self.runner, model, args)
        p.width, p.height, p.resize_mode = 96, 64, 0
        for key, value in fields.items():
            setattr(p, key, value)
        return p


def app_started(sd3_loaded: bool) -> None:
    REGISTRY.reapply(bridge.DECLARED.retarget, sd3_loaded)


def errors() -> list[tuple[str, str]]:
    return [entry for entry in fake_scripts.ERRORS.reported if entry[0].endswith(SCRIPT_FILE)]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER_NAME) and r.levelno >= logging.WARNING]


# --- the fake reproduces the report ------------------------------------------------------------


def test_without_bridge_every_unit_asserts_on_sd3(webui, files):
    ext = Extension(webui, files)
    p = ext.p("SD3", ext.unit())
    processing.process_images(p)
    (message, trace), = errors()
    assert message == f"Error running process: {SCRIPT_FILE}"
    assert "assert sd_version != StableDiffusionVersion.UNKNOWN" in trace
    assert "ControlNet 0" in p.extra_generation_params  # written before the assert, as users saw


# --- stepping aside ------------------------------------------------------------------------------------


def test_sd3_the_extension_hooks_nothing_and_asserts_nothing(webui, files):
    ext = Extension(webui, files)
    app_started(sd3_loaded=True)
    assert REGISTRY.get(bridge.PATCH_NAME).state is PatchState.APPLIED
    p = ext.p("SD3", ext.unit(), ext.unit(module="depth", model=ext.models["depth"]))
    processing.process_images(p)
    assert errors() == []
    unet = p.sd_model.model.diffusion_model
    assert getattr(unet, "cn_hooked", []) == [] and ext.script.latest_network is None
    assert ext.script.noise_modifier is None
    assert sorted(p.extra_generation_params) == ["ControlNet 0", "ControlNet 1"]  # its own entries, kept
    assert "Module: canny" in p.extra_generation_params["ControlNet 0"]


@pytest.mark.parametrize("family", ["SD1", "SDXL"])
def test_sd15_sdxl_run_the_extension_untouched(webui, files, family):
    outcomes = []
    for with_bridge in (False, True):
        ext = Extension(webui, files)
        if with_bridge:
            app_started(sd3_loaded=False)
            assert REGISTRY.get(bridge.PATCH_NAME).state is not PatchState.APPLIED
            assert "__sd3_original__" not in vars(ext.module.Script.controlnet_main_entry)
        p = ext.p(family, ext.unit(model="control_v11p_sd15_canny [00000002]"))
        processing.process_images(p)
        outcomes.append((p.controlnet_hooked, dict(p.extra_generation_params), errors()))
        assert bridge.units(p) == []
        REGISTRY.undo(bridge.PATCH_NAME)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == ["control_v11p_sd15_canny [00000002]"] and outcomes[0][2] == []


def test_the_wrapper_passes_through_when_the_model_is_not_sd3(webui, files):
    """Applied (SD3 loaded at app start) but the generation's model is SDXL: the extension's own entry runs."""
    ext = Extension(webui, files)
    app_started(sd3_loaded=True)
    p = ext.p("SDXL", ext.unit())
    ext.script.controlnet_main_entry(p)
    assert p.sd_model.model.diffusion_model.cn_hooked == [ext.models["canny"]]


def test_sd3_after_sdxl_drops_what_the_extension_left_hooked(webui, files):
    ext = Extension(webui, files)
    p = ext.p("SDXL", ext.unit())
    ext.script.controlnet_main_entry(p)  # SDXL generation, no postprocess (interrupted)
    unet = p.sd_model.model.diffusion_model
    assert unet.cn_hooked
    app_started(sd3_loaded=True)
    ext.script.controlnet_main_entry(ext.p("SD3", ext.unit()))
    assert unet.cn_hooked == [] and ext.script.latest_network is None


def test_model_switch_applies_and_undoes(webui, files):
    """SD3-only: the registry applies it while an SD3 model is loaded and puts the extension's own back after."""
    ext = Extension(webui, files)
    original = ext.module.Script.controlnet_main_entry
    assert bridge.PATCH.sd3_only
    app_started(sd3_loaded=True)
    assert ext.module.Script.controlnet_main_entry is not original
    app_started(sd3_loaded=False)
    assert ext.module.Script.controlnet_main_entry is original


def test_not_installed_is_quiet(webui, caplog):
    with caplog.at_level(logging.DEBUG, logger=LOGGER_NAME):
        app_started(sd3_loaded=True)
    assert REGISTRY.get(bridge.PATCH_NAME).state is PatchState.APPLIED  # nothing to wrap
    assert warnings(caplog) == []
    assert bridge.units(processing.StableDiffusionProcessingTxt2Img(fake_scripts.ScriptRunner(),
                                                                    models.Model("SD3"), [])) == []
    assert bridge.status() == {"extension_found": False, "missing": []}


def test_another_version_without_its_main_entry_is_one_line(webui, files, caplog, monkeypatch):
    ext = Extension(webui, files)
    monkeypatch.delattr(ext.module.Script, "controlnet_main_entry")
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        app_started(sd3_loaded=True)
        app_started(sd3_loaded=True)
    patch = REGISTRY.get(bridge.PATCH_NAME)
    assert patch.state is PatchState.UNAVAILABLE and "Script.controlnet_main_entry" in patch.reason
    (line,) = warnings(caplog)
    assert bridge.FEATURE in line
    assert bridge.units(ext.p("SD3", ext.unit())) == []


# --- its units as our requests ---------------------------------------------------------------------------


def test_a_canny_unit_becomes_a_request(webui, files):
    ext = Extension(webui, files)
    unit = ext.unit(weight=0.6, guidance_start=0.1, guidance_end=0.8, resize_mode="Resize and Fill",
                    threshold_a=40, threshold_b=90, processor_res=256)
    (request,) = bridge.units(ext.p("SD3", unit))
    assert request.source == "ControlNet extension unit 0"
    assert request.path == files["canny"] and request.model == ext.models["canny"]
    assert (request.strength, request.start, request.end) == (0.6, 0.1, 0.8)
    assert request.resize_mode is ResizeMode.RESIZE_AND_FILL
    assert request.preprocessor == "none" and request.preprocessed_by == "canny" and request.control_type is None
    (call,) = ext.preprocessors.get_preprocessor("canny").calls
    assert (call["resolution"], call["slider_1"], call["slider_2"]) == (256, 40, 90)
    expected = ext.preprocessors.get_preprocessor("canny")(unit["image"], 256, 40, 90)
    assert request.image.mode == "RGB" and request.image.size == (64, 48)
    assert np.array_equal(np.asarray(request.image), np.repeat(expected[:, :, None], 3, axis=2))


def test_depth_preprocessors_ask_for_invert(webui, files):
    ext = Extension(webui, files)
    depth = ext.unit(module="depth_midas", model=ext.models["depth"])  # by label
    by_name = ext.unit(module="depth", model=ext.models["depth"])
    plain = ext.unit(module="none", model=ext.models["depth"])
    requests = bridge.units(ext.p("SD3", depth, by_name, plain))
    assert [(r.source, r.preprocessor, r.preprocessed_by) for r in requests] == [
        ("ControlNet extension unit 0", "invert", "depth_midas"), ("ControlNet extension unit 1", "invert", "depth_midas"),
        ("ControlNet extension unit 2", "none", "none")]
    grey = depth["image"].mean(axis=2).astype(np.uint8)
    assert np.array_equal(np.asarray(requests[0].image)[:, :, 0], grey)  # the map as made: we invert it


@pytest.mark.parametrize(("name", "tags", "depth"), [("depth_anything_v2", ["Depth"], True), ("depth_zoe", [], True),
                                                     ("normal_midas", ["NormalMap"], False), ("lineart", [], False),
                                                     ("leres_custom", ["depth"], True)])
def test_depth_rule(name, tags, depth):
    assert bridge.is_depth(types.SimpleNamespace(name=name, label=name, tags=tags)) is depth


def test_resize_modes():
    from enum import Enum

    ExtensionResize = Enum("ResizeMode", {"RESIZE": "Just Resize", "INNER_FIT": "Crop and Resize",
                                          "OUTER_FIT": "Resize and Fill"})
    assert [bridge.resize_mode(m) for m in ExtensionResize] == list(ResizeMode)
    assert bridge.resize_mode("Just Resize") is ResizeMode.JUST_RESIZE


def test_img2img_without_an_image_takes_the_init_image_and_a1111s_resize_mode(webui, files):
    ext = Extension(webui, files)
    init = Image.fromarray(np.full((40, 30, 3), 77, np.uint8))
    unit = ext.unit(module="none", image=None)
    (request,) = bridge.units(ext.p("SD3", unit, img2img=True, init_images=[init], resize_mode=2))
    assert request.image.size == (30, 40) and np.asarray(request.image).max() == 77
    assert request.resize_mode is ResizeMode.RESIZE_AND_FILL


def test_pixel_perfect_runs_at_the_extensions_estimate(webui, files):
    ext = Extension(webui, files)
    bridge.units(ext.p("SD3", ext.unit(pixel_perfect=True, processor_res=512)))
    (call,) = ext.preprocessors.get_preprocessor("canny").calls
    assert call["resolution"] == 64  # the fake's estimate from its get_target_dimensions: min(height, width)


def test_disabled_units_and_other_families_give_nothing(webui, files):
    ext = Extension(webui, files)
    assert bridge.units(ext.p("SD3")) == []
    assert bridge.units(ext.p("SDXL", ext.unit())) == []


def test_the_img2img_batch_tab_keeps_its_units(webui, files):
    """Its batch tab reads the units once (``enabled_units``) and feeds each the next image: left alone on SD3."""
    ext = Extension(webui, files)
    app_started(sd3_loaded=True)
    batch_units = ["unit fed by the batch tab"]
    ext.script.enabled_units = batch_units
    ext.script.controlnet_main_entry(ext.p("SD3", ext.unit()))
    assert ext.script.enabled_units is batch_units


def test_the_panel_numbering_names_the_unit(webui, files):
    ext = Extension(webui, files)
    (request,) = bridge.units(ext.p("SD3", {"enabled": False}, {"enabled": False}, ext.unit()))
    assert request.source == "ControlNet extension unit 2"


def test_remote_call_overrides_apply(webui, files):
    ext = Extension(webui, files)
    webui.shared.opts.data["control_net_allow_script_control"] = True
    (request,) = bridge.units(ext.p("SD3", ext.unit(), control_net_weight=[0.25]))
    assert request.strength == 0.25


@pytest.mark.parametrize(("unit", "says"), [
    ({"model": "control_v11p_sd15_canny [00000002]"}, "not an SD3 ControlNet"),
    ({"model": "sd3.5_large_controlnet_blur_cut [00000003]"}, "truncated"),
    ({"model": "None"}, "no ControlNet model selected"),
    ({"model": "gone [deadbeef]"}, "not found"),
    ({"image": None}, "no input image"),
    ({"module": "clip_vision"}, "makes no control image"),
    ({"module": "no_such_preprocessor"}, "unknown to the ControlNet extension"),
])
def test_a_unit_that_cannot_run_is_one_line_and_skipped(webui, files, caplog, unit, says):
    ext = Extension(webui, files)
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        requests = bridge.units(ext.p("SD3", ext.unit(**unit), ext.unit()))
    assert [r.source for r in requests] == ["ControlNet extension unit 1"]
    (line,) = warnings(caplog)
    assert line.startswith("ControlNet extension unit 0 skipped:") and says in line


def test_a_failing_preprocessor_is_one_line(webui, files, caplog):
    ext = Extension(webui, files)

    def offline(*args, **kwargs):
        raise ConnectionError("annotator download failed")

    ext.preprocessors.get_preprocessor("depth").cached_call = offline
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        assert bridge.units(ext.p("SD3", ext.unit(module="depth"))) == []
    (line,) = warnings(caplog)
    assert "unit 0 skipped" in line and "depth_midas failed" in line and "annotator download failed" in line


def test_a_model_found_by_name_as_the_extension_does(webui, files):
    ext = Extension(webui, files)
    (request,) = bridge.units(ext.p("SD3", ext.unit(model="SD3.5_Large_ControlNet_Canny")))
    assert request.path == files["canny"]


def test_units_run_beside_the_stepped_aside_extension(webui, files):
    """The whole generation on SD3: the extension's process and ours (which reads its units) in either order."""
    ext = Extension(webui, files)
    app_started(sd3_loaded=True)
    p = ext.p("SD3", ext.unit())
    processing.process_images(p)
    (request,) = bridge.units(p)
    assert request.path == files["canny"] and errors() == []


def test_the_core_takes_the_extensions_units_after_its_own(webui, files):
    from lib_sd3.webui.controlnet import CONTROLNETS
    from lib_sd3.webui.options import NO_MODEL

    ext = Extension(webui, files)
    accordion = {f"controlnet_{n}_model": NO_MODEL for n in (1, 2, 3)}
    (request,) = CONTROLNETS.requests(ext.p("SD3", ext.unit()), accordion)
    assert request.source == "ControlNet extension unit 0" and request.path == files["canny"]
