"""IC-Light shim: both IC-Light shapes in an A1111-like script runner, with and without the shim.

The fakes (tests/a1111/iclight, tests/a1111/scripts.py, processing.py) reproduce the field notes first: the old
shape logs ``AssertionError`` on every generation, the new shape enabled on SD3 fails the request. Then
the shim must make every combination complete, skip IC-Light only where it cannot work, say so, and
leave everything else -- other scripts' errors included -- as A1111 does it.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
from a1111 import models, processing
from a1111 import scripts as fake_scripts
from feature_registration import registered

from lib_sd3 import LOGGER_NAME, iclight
from lib_sd3.patching import PatchState
from lib_sd3.webui import hooks, startup
from lib_sd3.webui import iclight as shim
from lib_sd3.webui.registry import REGISTRY

registered(shim)


def app_started():
    """What start-up does for this feature at each app start (UI reload): re-wrap the runners' scripts, then its
    app-started hooks."""
    from lib_sd3.webui.registry import REGISTRY

    REGISTRY.reapply(shim.DECLARED.retarget, sd3_loaded=False)
    for hook in shim.DECLARED.app_started:
        hook()


SHAPES_DIR = Path(__file__).parent / "a1111" / "iclight"
SCRIPT_FILES = {
    "old": SHAPES_DIR / "old_8c2963e" / "scripts" / "ic_light_script.py",
    "new": SHAPES_DIR / "new_ff82902" / "scripts" / "ic_light_script.py",
}
ICLIGHT_FILE = "extensions/sd-webui-ic-light/scripts/ic_light_script.py"
BROKEN_FILE = "extensions/other/scripts/broken.py"
FAMILIES = ("SD1", "SD2", "SDXL", "SD3")


class BrokenScript(fake_scripts.Script):
    """Another extension's script that fails in process() on every generation."""

    def title(self):
        return "Broken"

    def show(self, is_img2img):
        return fake_scripts.AlwaysVisible

    def process(self, p, *args):
        raise RuntimeError("another extension's bug")


class CountingScript(fake_scripts.Script):
    """Another extension's script that works; it must see every hook call it saw before."""

    def __init__(self):
        self.calls = []

    def title(self):
        return "Counting"

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.calls.append(("process_before_every_sampling", args, sorted(kwargs)))


@pytest.fixture
def webui(fake_webui):
    fake_scripts.ERRORS.reported.clear()
    fake_webui.module("modules.errors", report=fake_scripts.ERRORS.report)
    fake_webui.module("modules.scripts", Script=fake_scripts.Script, ScriptRunner=fake_scripts.ScriptRunner,
                      AlwaysVisible=fake_scripts.AlwaysVisible, PostSampleArgs=fake_scripts.PostSampleArgs,
                      PostprocessImageArgs=fake_scripts.PostprocessImageArgs, scripts_txt2img=None, scripts_img2img=None)
    fake_webui.module("modules.processing", StableDiffusionProcessing=processing.StableDiffusionProcessing,
                      StableDiffusionProcessingTxt2Img=processing.StableDiffusionProcessingTxt2Img,
                      StableDiffusionProcessingImg2Img=processing.StableDiffusionProcessingImg2Img)
    fake_webui.drop_on_close("libiclight")  # the fake IC-Light scripts import it from their folder
    yield fake_webui
    REGISTRY.undo(shim.PATCH_NAME)


def build_runner(webui, shape: str, is_img2img: bool = False):
    """A runner as A1111 builds it at UI creation: another extension, IC-Light, a third one."""
    module = fake_scripts.load_script_module(str(SCRIPT_FILES[shape]), str(SHAPES_DIR))
    runner = fake_scripts.ScriptRunner()
    runner.add(BrokenScript(), [], BROKEN_FILE, is_img2img)
    script = module.ICLightScript()
    runner.add(script, [{}], ICLIGHT_FILE, is_img2img)  # gr.State({}) until the user submits
    counting = CountingScript()
    runner.add(counting, ["value"], "extensions/counting/scripts/counting.py", is_img2img)
    webui.module("modules.scripts", **{"scripts_img2img" if is_img2img else "scripts_txt2img": runner})
    return runner, script, counting


def generate(runner, family: str, enabled: bool, *, img2img: bool = False, hr: bool = False, first_stage=True):
    args = runner.script_args(**{"IC Light": [{"enabled": enabled, "input_fg": "foreground"}]})
    kind = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
    p = kind(runner, models.Model(family, first_stage=first_stage), args, enable_hr=hr)
    return p, processing.process_images(p)


def errors_of(filename: str) -> list[tuple[str, str]]:
    return [entry for entry in fake_scripts.ERRORS.reported if entry[0].endswith(filename)]


def shim_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER_NAME) and "IC-Light skipped" in r.getMessage()]


# --- the fakes reproduce what users saw -------------------------------------------------------


def test_without_shim_old_shape_asserts_on_every_generation(webui):
    runner, _, _ = build_runner(webui, "old")
    for enabled in (False, True):
        fake_scripts.ERRORS.reported.clear()
        generate(runner, "SD1", enabled)
        (message, trace), = [e for e in errors_of(ICLIGHT_FILE) if "process_before_every_sampling" in e[0]]
        assert message == f"Error running process_before_every_sampling: {ICLIGHT_FILE}"
        assert "assert self.backend_type == BackendType.Forge" in trace and "AssertionError" in trace


def test_without_shim_new_shape_enabled_on_sd3_fails_the_request(webui):
    runner, _, _ = build_runner(webui, "new")
    with pytest.raises(TypeError, match="MMDiT.forward"):
        generate(runner, "SD3", True)


def test_without_shim_old_shape_on_early_sd3_logs_missing_first_stage(webui):
    runner, _, _ = build_runner(webui, "old")
    generate(runner, "SD3", True, first_stage=False)
    assert any("get_first_stage_encoding" in trace for _, trace in errors_of(ICLIGHT_FILE))


# --- with the shim ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["old", "new"])
@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_combination_completes(webui, caplog, shape, enabled, family):
    runner, _, counting = build_runner(webui, shape)
    app_started()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        p, processed = generate(runner, family, enabled)

    assert errors_of(ICLIGHT_FILE) == []
    assert [m for m, _ in errors_of(BROKEN_FILE)] == [f"Error running process: {BROKEN_FILE}"]
    assert counting.calls == [("process_before_every_sampling", ("value",), ["c", "noise", "uc", "x"])]
    applied = [patches for patches in p.sampled_with_patches if patches]
    skipped = enabled and family != "SD1"
    if enabled and family == "SD1":
        assert applied == [[("diffusion_model", ("c_concat", ("latent", "foreground")))]]
    else:
        assert applied == []
    if skipped:
        assert p.extra_generation_params == {"IC-Light": f"skipped ({family} model)"}
        (comment,) = p.comments
        assert comment.startswith("IC-Light was skipped") and family in comment and "SD1.5" in comment
        assert processed.comments == comment + "\n"
        (warning,) = shim_warnings(caplog)
        assert family in warning and "SD1.5" in warning
    else:
        assert p.extra_generation_params == {} and p.comments == {} and shim_warnings(caplog) == []


@pytest.mark.parametrize("shape", ["old", "new"])
def test_disabled_iclight_gets_nothing_added(webui, shape):
    """Disabled: the same result as without the shim, bar the old shape's AssertionError."""
    outcomes = []
    for with_shim in (False, True):
        fake_scripts.ERRORS.reported.clear()
        runner, script, _ = build_runner(webui, shape)
        if with_shim:
            app_started()
        p, processed = generate(runner, "SD1", False)
        outcomes.append((p.extra_generation_params, p.comments, p.sampled_with_patches, processed.images,
                         vars(script).get("args", "no args attribute"), errors_of(BROKEN_FILE)[0][0]))
        iclight_errors = [m for m, _ in errors_of(ICLIGHT_FILE)]
        expected = ([f"Error running process_before_every_sampling: {ICLIGHT_FILE}"]
                    if shape == "old" and not with_shim else [])
        assert iclight_errors == expected
        REGISTRY.undo(shim.PATCH_NAME)
    assert outcomes[0] == outcomes[1]


def test_new_shape_sd1_keeps_its_extra_images(webui):
    runner, _, _ = build_runner(webui, "new")
    app_started()
    _, processed = generate(runner, "SD1", True)
    assert processed.images == ["image", "image"]  # IC-Light's detail image, as without the shim


def test_hires_fix_warns_once_per_generation(webui, caplog):
    runner, _, _ = build_runner(webui, "new")
    app_started()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        p, _ = generate(runner, "SD3", True, hr=True)
        generate(runner, "SDXL", True, hr=True)
    assert len(p.sampled_with_patches) == 2 and not any(p.sampled_with_patches)
    assert len(p.comments) == 1
    assert len(shim_warnings(caplog)) == 2  # one per generation


def test_img2img_init_image_untouched_when_skipped(webui):
    runner, _, _ = build_runner(webui, "new", is_img2img=True)
    app_started()
    p, _ = generate(runner, "SD3", True, img2img=True)
    assert p.init_images == ["init image"]
    p, _ = generate(runner, "SD1", True, img2img=True)
    assert p.init_images == ["lightmap"]


def test_skip_is_sticky_after_a_skipped_earlier_hook(webui):
    """Stale ``self.args`` from a skipped before_process must not reach later hooks of the same p."""
    runner, script, _ = build_runner(webui, "new")
    app_started()
    generate(runner, "SD1", True)
    assert script.args is not None and script.args.enabled  # left over from the SD1.5 generation
    p, processed = generate(runner, "SD3", True)
    assert not any(p.sampled_with_patches) and processed.images == ["image"]


def test_setting_off_leaves_iclight_as_it_is(webui):
    webui.shared.opts.data["sd3_iclight_shim"] = False
    runner, _, _ = build_runner(webui, "old")
    app_started()
    generate(runner, "SD1", False)
    assert [m for m, _ in errors_of(ICLIGHT_FILE)] == [f"Error running process_before_every_sampling: {ICLIGHT_FILE}"]


def test_undo_restores_the_original_methods(webui):
    runner, script, counting = build_runner(webui, "new")
    cls = type(script)
    app_started()
    wrapped = sorted(h for h in iclight.GENERATION_HOOKS if h in vars(script))
    assert wrapped == ["before_process", "postprocess", "postprocess_image", "process_before_every_sampling"]
    assert vars(counting) == {"calls": [], "filename": counting.filename, "tabname": "txt2img", "alwayson": True,
                              "args_from": counting.args_from, "args_to": counting.args_to,
                              "default_args": ["value"]}
    assert REGISTRY.undo(shim.PATCH_NAME) is PatchState.PENDING
    assert not any(h in vars(script) for h in iclight.GENERATION_HOOKS)
    for hook in wrapped:
        assert getattr(script, hook).__func__ is vars(cls)[hook]
    with pytest.raises(TypeError, match="MMDiT.forward"):
        generate(runner, "SD3", True)


def test_retarget_follows_a_ui_reload(webui):
    old_runner, old_script, _ = build_runner(webui, "old")
    app_started()
    assert "process_before_every_sampling" in vars(old_script)
    new_runner, new_script, _ = build_runner(webui, "old")  # "Reload UI": new runner, new script objects
    app_started()
    assert "process_before_every_sampling" not in vars(old_script)
    assert "process_before_every_sampling" in vars(new_script)
    generate(new_runner, "SD1", False)
    assert errors_of(ICLIGHT_FILE) == []


def test_app_started_wraps_both_runners_and_reports_status(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    build_runner(webui, "old")
    _, img2img_script, _ = build_runner(webui, "new", is_img2img=True)
    app = FastAPI()
    assert shim.PATCH_NAME in hooks.RETARGET and shim.check_model_patcher in hooks.APP_STARTED
    startup.on_app_started(None, app)
    assert "before_process" in vars(img2img_script)
    body = TestClient(app).get("/sd3/status").json()
    feature = body["features"][shim.FEATURE]
    assert feature["state"] == "active" and feature["enabled"] is True
    assert sorted((s["tab"], s["shape"], s["backend"]) for s in feature["iclight_scripts"]) == [
        ("img2img", iclight.Shape.APPLY_BEFORE_SAMPLING.value, "A1111"),
        ("txt2img", iclight.Shape.APPLY_IN_PROCESS.value, "A1111"),
    ]


def test_runners_not_built_yet_apply_nothing(webui):
    assert REGISTRY.apply(shim.PATCH_NAME) is PatchState.APPLIED
    assert shim.iclight_scripts() == []


def test_a1111_without_script_runners_disables_the_shim_with_a_reason(webui):
    webui.module("modules.scripts").__dict__.pop("scripts_img2img")
    assert REGISTRY.apply(shim.PATCH_NAME) is PatchState.UNAVAILABLE
    assert "scripts_img2img" in REGISTRY.get(shim.PATCH_NAME).reason


# --- recognition and the pure helpers ------------------------------------------------------------


def test_recognised_by_title_and_module_not_path(webui):
    runner, script, _ = build_runner(webui, "old")
    assert iclight.find_scripts(runner) == [script]
    assert iclight.shape_of(script) is iclight.Shape.APPLY_IN_PROCESS
    _, new_script, _ = build_runner(webui, "new")
    assert iclight.shape_of(new_script) is iclight.Shape.APPLY_BEFORE_SAMPLING

    def script_in_module(module_name: str, namespace: dict):
        namespace = {"__name__": module_name, "Script": fake_scripts.Script, **namespace}
        exec("class ICLightScript(Script):\n    def title(self):\n        return 'IC Light'\n", namespace)
        return namespace["ICLightScript"]()

    assert not iclight.is_iclight_script(script_in_module("my_other_script.py", {}))
    args = sys.modules["libiclight.args"].ICLightArgs
    assert iclight.is_iclight_script(script_in_module("renamed.py", {"ICLightArgs": args}))
    lib_iclight = types.SimpleNamespace(__module__="lib_iclight.parameters")  # the Haoming02 fork's package
    assert iclight.is_iclight_script(script_in_module("renamed.py", {"ICLightArgs": lib_iclight}))
    assert not iclight.is_iclight_script(BrokenScript())


@pytest.mark.parametrize(("args", "expected"), [
    ((), False), (({},), False), (({"enabled": False},), False), (({"enabled": True},), True),
    (({"enabled": "true"},), True), (({"enabled": "false"},), False), ((True, "FC"), True), ((False,), False),
    ((None,), False),
])
def test_enabled_in_script_args(args, expected):
    assert iclight.enabled_in(args) is expected


def test_model_family_from_a1111_flags():
    for family in FAMILIES:
        assert iclight.model_family(models.Model(family)) == family
    assert iclight.skip_reason(models.Model("SD1")) is None
    assert "SD3" in iclight.skip_reason(models.Model("SD3"))
    before_1_6 = types.SimpleNamespace(is_sdxl=False, is_sd2=False)  # no is_sd1 / is_sd3 yet
    assert iclight.model_family(before_1_6) == "SD1"
    assert iclight.model_family(types.SimpleNamespace(is_sdxl=True, is_sd2=False)) == "SDXL"
    assert iclight.model_family(None) == "none" and iclight.skip_reason(None) == "no model is loaded"
    unknown = types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False, is_ssd=False, is_sd3=False)
    assert "no family A1111 recognises" in iclight.skip_reason(unknown)


def test_model_patcher_missing_gets_one_startup_line(webui, tmp_path, caplog):
    iclight_dir, patcher_dir = tmp_path / "sd-webui-ic-light", tmp_path / "sd-webui-model-patcher"
    (iclight_dir / "libiclight").mkdir(parents=True)
    (patcher_dir / "lib_modelpatcher").mkdir(parents=True)
    active = [types.SimpleNamespace(path=str(iclight_dir))]
    webui.module("modules.extensions", active=lambda: list(active))
    shim._notified.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        shim.check_model_patcher()
        shim.check_model_patcher()  # a UI reload: still one line
    lines = [r.getMessage() for r in caplog.records if "sd-webui-model-patcher" in r.getMessage()]
    assert len(lines) == 1 and iclight.MODEL_PATCHER_URL in lines[0]

    active.append(types.SimpleNamespace(path=str(patcher_dir)))
    shim._notified.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        shim.check_model_patcher()
    assert not [r for r in caplog.records if "sd-webui-model-patcher" in r.getMessage()]
    assert shim.status()["model_patcher"] is True


def test_model_patcher_notice_only_with_iclight():
    assert iclight.model_patcher_notice(False, False) is None
    assert iclight.model_patcher_notice(True, True) is None
    assert iclight.MODEL_PATCHER_URL in iclight.model_patcher_notice(True, False)
    assert iclight.model_patcher_available([], ["lib_modelpatcher", "os"])
    assert not iclight.model_patcher_available([], ["os"])
