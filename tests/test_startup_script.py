"""startup.install() and scripts/sd3.py against the fake A1111 (tests/a1111): callbacks, features, patches, the script."""

import importlib.util
import logging
import sys
import types

import pytest
from a1111.models import Model
from a1111.scripts import Script
from conftest import ROOT

from lib_sd3 import LOGGER_NAME
from lib_sd3.webui import hooks, script_args, settings, startup
from lib_sd3.webui.registry import REGISTRY

# Two feature modules as a helper would write them: one declares an SD3-only patch on the token
# counter, a global patch, hooks and a route; the other raises on import (a missing package, say).
FEATURE_OK = '''
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks
from modules import sd_hijack


def _sd3_lengths(original):
    def get_prompt_lengths(self, text):
        return "sd3", "counted"
    return get_prompt_lengths


def _detect():
    return None if hasattr(sd_hijack.StableDiffusionModelHijack, "get_prompt_lengths") else "no get_prompt_lengths"


SEEN = []
DECLARED = hooks.Feature(
    "test feature",
    patches=(
        Patch.from_swaps("test_token_counter", "test feature", _detect,
            lambda: [AttributeSwap(sd_hijack.StableDiffusionModelHijack, "get_prompt_lengths", _sd3_lengths)],
            sd3_only=True),
        Patch.from_swaps("test_global", "test feature", lambda: None,
            lambda: [AttributeSwap(sd_hijack, "helper", lambda original: lambda: "patched")]),
    ),
    process=(lambda p, args: SEEN.append(("process", p, args)),),
    before_every_sampling=(lambda p, args: SEEN.append(("before_every_sampling", p, args)),),
    postprocess=(lambda p, processed, args: SEEN.append(("postprocess", p, processed, args)),),
    ui=(lambda is_img2img: SEEN.append(("ui", is_img2img)),),
    model_loaded=(lambda model: SEEN.append(("model_loaded", model)),),
    routes=(lambda router: router.add_api_route("/test", lambda: {"hello": "sd3"}, methods=["GET"]),),
    status=lambda: {"extra": 1},
)
'''
FEATURE_BROKEN = "import sd3_package_that_is_not_installed  # noqa\n"


class StableDiffusionModelHijack:
    def get_prompt_lengths(self, text):
        return 1, 75


def _helper():
    return "original"


@pytest.fixture
def webui(fake_webui, monkeypatch, tmp_path):
    """The fake A1111 plus an isolated extension state (registry, hooks, features) per test."""
    fake_webui.module("modules.scripts", Script=Script, AlwaysVisible=object())
    fake_webui.module("modules.sd_hijack", StableDiffusionModelHijack=StableDiffusionModelHijack, helper=_helper)
    monkeypatch.setattr(REGISTRY, "_patches", {})
    monkeypatch.setattr(REGISTRY, "_logged", set())
    for name in ("PROCESS", "BEFORE_EVERY_SAMPLING", "POSTPROCESS", "ROUTES", "UI", "MODEL_LOADED", "APP_STARTED",
                 "INSTALL", "BEFORE_MMDIT_REWRITE", "RETARGET", "API_CHECKS"):
        monkeypatch.setattr(hooks, name, [])
    monkeypatch.setattr(hooks, "STATUS", {})
    monkeypatch.setattr(startup, "_FAILED_FEATURES", {})
    monkeypatch.setattr(startup, "_REGISTERED", {})
    (tmp_path / "sd3_test_feature_ok.py").write_text(FEATURE_OK)
    (tmp_path / "sd3_test_feature_broken.py").write_text(FEATURE_BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(startup, "FEATURE_MODULES", ("sd3_test_feature_broken", "sd3_test_feature_ok"))
    monkeypatch.delitem(sys.modules, "sd3_test_feature_ok", raising=False)
    fake_webui.drop_on_close("sd3_test_feature_ok")  # imported by the test's start-up
    yield fake_webui
    REGISTRY.undo_all()


@pytest.fixture
def sd3_log(caplog):
    """The extension's logger does not propagate (A1111 configures the root logger), so hook in directly."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    yield caplog
    logger.removeHandler(caplog.handler)


def load_script():
    """Load scripts/sd3.py by path, the way A1111's script loader does."""
    spec = importlib.util.spec_from_file_location("sd3_script_under_test", ROOT / "scripts" / "sd3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a1111(name):
    return sys.modules[name]


def feature():
    import sd3_test_feature_ok

    return sd3_test_feature_ok


def model(is_sd3):
    return Model("SD3" if is_sd3 else "SD1", sd_checkpoint_info=None)


# --- start-up ----------------------------------------------------------------------------------------

def test_broken_feature_is_one_log_line_and_start_up_continues(webui, sd3_log):
    load_script()  # runs startup.install()
    warnings = [r for r in sd3_log.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "sd3_test_feature_broken" in warnings[0].getMessage()
    assert "sd3_package_that_is_not_installed" in warnings[0].getMessage()
    assert any("sd-webui-sd3 ready" in r.getMessage() for r in sd3_log.records)
    assert {"test_token_counter", "test_global"} <= {p.name for p in REGISTRY}  # the good feature loaded
    assert startup._FAILED_FEATURES.keys() == {"sd3_test_feature_broken"}
    startup.install()  # A1111 reloads scripts on "Reload UI": still one line for the broken feature
    assert len([r for r in sd3_log.records if r.levelno >= logging.WARNING]) == 1


def test_callbacks_registered_once_per_install(webui):
    load_script()
    core = ("ui_settings", "app_started", "model_loaded", "script_unloaded")
    # feature modules imported by other tests may add their own callbacks (e.g. before_token_counter)
    assert {name: len(webui.callbacks.get(name, [])) for name in core} == dict.fromkeys(core, 1)


def test_global_patch_applied_at_start_sd3_only_waits_for_a_model(webui):
    load_script()
    hijack = StableDiffusionModelHijack()
    assert a1111("modules.sd_hijack").helper() == "patched"
    assert hijack.get_prompt_lengths("a cat") == (1, 75)  # no model loaded: A1111's own
    assert REGISTRY.get("test_token_counter").state.value == "pending"


def test_model_loaded_applies_and_undoes_sd3_only_patches(webui):
    load_script()
    original = StableDiffusionModelHijack.__dict__["get_prompt_lengths"]
    hijack = StableDiffusionModelHijack()
    webui.fire("model_loaded", model(True))
    assert hijack.get_prompt_lengths("a cat") == ("sd3", "counted")
    assert REGISTRY.get("test_token_counter").state.value == "applied"
    webui.fire("model_loaded", model(False))  # user switches to SD1.5 / SDXL
    assert StableDiffusionModelHijack.__dict__["get_prompt_lengths"] is original
    assert hijack.get_prompt_lengths("a cat") == (1, 75)
    assert a1111("modules.sd_hijack").helper() == "patched"  # global patches stay
    assert [e[0] for e in feature().SEEN] == ["model_loaded", "model_loaded"]


def test_failing_model_loaded_hook_is_logged_and_the_rest_run(webui, sd3_log):
    load_script()

    def broken(_model):
        raise RuntimeError("boom")

    hooks.MODEL_LOADED.insert(0, broken)
    webui.fire("model_loaded", model(True))
    assert any("broken" in r.getMessage() and r.levelno == logging.ERROR for r in sd3_log.records)
    assert feature().SEEN[-1][0] == "model_loaded"
    assert REGISTRY.get("test_token_counter").state.value == "applied"


def test_script_unloaded_undoes_everything(webui):
    load_script()
    webui.fire("model_loaded", model(True))
    webui.fire("script_unloaded")
    assert a1111("modules.sd_hijack").helper() == "original"
    assert StableDiffusionModelHijack().get_prompt_lengths("x") == (1, 75)


def test_ui_settings_and_status_route(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    load_script()
    webui.fire("ui_settings")
    assert set(webui.shared.opts.data_labels) == {s.key for s in settings.SETTINGS}
    app = FastAPI()
    webui.fire("app_started", None, app)
    client = TestClient(app)
    assert client.get("/sd3/test").json() == {"hello": "sd3"}
    body = client.get("/sd3/status").json()
    assert body["features"]["test feature"]["extra"] == 1
    assert body["features"]["test feature"]["patches"] == {"test_token_counter": "pending", "test_global": "applied"}
    assert "sd3_test_feature_broken" in body["features"]["startup"]["failed_features"]


# --- the script ------------------------------------------------------------------------------------

def test_script_is_always_visible_and_builds_its_accordion(webui, monkeypatch):
    module = load_script()
    gradio = __import__("gradio")
    accordions = []

    class Accordion(gradio.Accordion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accordions.append(self)

    monkeypatch.setattr(gradio, "Accordion", Accordion)
    script = module.SD3Script()
    assert script.title() == "SD3"
    assert script.show(False) is a1111("modules.scripts").AlwaysVisible
    rows = [a for a in script_args.ARGS if a.row is not None]  # the others: built by their feature (none here)
    for is_img2img, tab in ((False, "txt2img"), (True, "img2img")):
        components = script.ui(is_img2img)
        assert accordions[-1].args == ("SD3",) and accordions[-1].kwargs["elem_id"] == f"sd3_accordion_{tab}"
        assert len(components) == len(script_args.ARGS)
        by_name = dict(zip(script_args.NAMES, components, strict=True))
        components = [by_name[a.name] for a in rows]
        assert [c.kwargs["label"] for c in components] == [a.label for a in rows]
        assert [c.kwargs["elem_id"] for c in components] == [f"sd3_{a.name}_{tab}" for a in rows]
        others = [by_name[a.name] for a in script_args.ARGS if a.row is None]  # their feature is not registered:
        assert others and all(type(c).__name__ == "State" and c.value == "setting" for c in others)  # defaults
        for component, arg in zip(components, rows, strict=True):
            if arg.choices:
                assert script_args.is_default_word(component.value)  # "default (on)" etc.
            elif arg.slider:
                assert component.value == settings.get(arg.setting_key)  # a slider starts at the setting
            else:
                assert component.value == [] and component.kwargs["multiselect"]  # none picked: the setting
    assert [e for e in feature().SEEN if e[0] == "ui"] == [("ui", False), ("ui", True)]


def test_process_takes_ui_values_and_the_api_dict(webui):
    script = load_script().SD3Script()
    webui.shared.opts.data.update(sd3_flow_samplers=False, sd3_nan_guard=True, sd3_mixdq="w4a8")
    p, q, r, t = (types.SimpleNamespace() for _ in range(4))
    script.process(p, "on", "off", "w8a8")  # from the UI: component values in order
    script.process(q, {"nan_guard": False})  # from alwayson_scripts: one dict, the rest from settings
    script.process_before_every_sampling(r, "setting", "setting", "off", batch_number=0, prompts=[], seeds=[])
    script.postprocess(t, "processed", {"mixdq": "w8a8"})
    slg_keys = {"slg", "slg_layers", "slg_scale", "slg_start", "slg_end"}  # SLG's own args, tested elsewhere
    seen = [(*e[:-1], {k: v for k, v in e[-1].items() if k not in slg_keys and not k.startswith("controlnet_")})
            for e in feature().SEEN if e[0] != "ui"]  # ControlNet units: tests/test_webui_controlnet.py
    assert seen == [
        ("process", p, {"flow_samplers": True, "nan_guard": False, "mixdq": "w8a8"}),
        ("process", q, {"flow_samplers": False, "nan_guard": False, "mixdq": "w4a8"}),
        ("before_every_sampling", r, {"flow_samplers": False, "nan_guard": True, "mixdq": "off"}),
        ("postprocess", t, "processed", {"flow_samplers": False, "nan_guard": True, "mixdq": "w8a8"}),
    ]


def test_options_are_resolved_once_per_generation_and_kept_on_p(webui):
    """``process`` resolves; the later hooks of the same generation see that very object (``p.sd3``), even
    if a setting changes meanwhile."""
    script = load_script().SD3Script()
    p = types.SimpleNamespace()
    script.process(p, {"nan_guard": False})
    webui.shared.opts.data.update(sd3_mixdq="w8a8", sd3_flow_samplers=False)
    script.process_before_every_sampling(p, {"nan_guard": False}, batch_number=0, prompts=[], seeds=[])
    script.postprocess(p, "processed", {"nan_guard": False})
    options = [e[-1] for e in feature().SEEN if e[0] != "ui"]
    assert len(options) == 3 and all(o is p.sd3.options for o in options)
    assert (p.sd3.options["mixdq"], p.sd3.options["flow_samplers"]) == ("off", True)


def test_a_bad_setting_value_costs_one_warning_line_and_the_default(webui, sd3_log):
    """A pasted infotext from another install can override ``sd3_mixdq`` with a config not present here."""
    script = load_script().SD3Script()
    webui.shared.opts.data.update(sd3_mixdq="int4")
    p = types.SimpleNamespace()
    script.process(p)
    assert p.sd3.options["mixdq"] == "off"
    lines = [r.getMessage() for r in sd3_log.records if r.levelno >= logging.WARNING and "int4" in r.getMessage()]
    assert len(lines) == 1 and "sd3_mixdq" in lines[0]


def test_process_rejects_bad_api_args_with_a_clear_error(webui):
    script = load_script().SD3Script()
    with pytest.raises(script_args.ScriptArgError, match="mixdq"):
        script.process(object(), {"mixdq": "w2a2"})


def test_start_up_never_loads_a_model(webui, monkeypatch):
    """Reading ``shared.sd_model`` loads A1111's checkpoint on first access, which inside script loading would
    load it before later extensions are imported: install() looks at ``sd_models.model_data`` instead, and the
    global (construction) patches are in place for the load A1111 starts after the scripts."""
    reads = []

    class Shared(types.ModuleType):
        @property
        def sd_model(self):
            reads.append(a1111("modules.sd_hijack").helper())
            return None

    shared = a1111("modules.shared")
    lazy = Shared("modules.shared")
    lazy.__dict__.update({k: v for k, v in vars(shared).items() if k != "sd_model"})
    monkeypatch.setitem(sys.modules, "modules.shared", lazy)
    monkeypatch.setattr(sys.modules["modules"], "shared", lazy)
    webui.module("modules.sd_models", model_data=types.SimpleNamespace(sd_model=None))
    load_script()
    assert reads == []
    assert a1111("modules.sd_hijack").helper() == "patched"
    assert not [e for e in feature().SEEN if e[0] == "model_loaded"]
    assert REGISTRY.get("test_token_counter").state.value == "pending"


def test_a_model_loaded_before_the_scripts_is_looked_at(webui):
    """"Reload UI" (after an install, say): A1111 keeps its model and calls no on_model_loaded for it."""
    loaded = model(True)
    webui.module("modules.sd_models", model_data=types.SimpleNamespace(sd_model=loaded))
    load_script()
    assert REGISTRY.get("test_token_counter").state.value == "applied"
    assert ("model_loaded", loaded) in feature().SEEN


def test_script_hands_a1111_its_paste_fields(webui):
    """Every accordion field pastes back from an infotext (``infotext_fields``) and travels with "Send to"
    (``paste_field_names``); labels and readers come from the one table in lib_sd3/webui/infotext.py."""
    from lib_sd3.webui import options

    script = load_script().SD3Script()
    components = script.ui(False)
    pasted_back = [name for name in options.NAMES if options.BY_NAME[name].paste is not None]  # not images
    by_name = dict(zip(options.NAMES, components, strict=True))
    assert [component for component, _ in script.infotext_fields] == [by_name[name] for name in pasted_back]
    keys = [key for _, key in script.infotext_fields]
    assert all(callable(key) and key in options.PASTED for key in keys)
    assert set(script.paste_field_names) == set(options.PASTED)
    pasted = [key({"SD3 flow samplers": "False", "SD3 SLG": "layers 0; scale 1; steps 0-1"}) for key in keys]
    assert pasted[:8] == ["off", None, "off", "on", ["0"], 1.0, 0.0, 1.0]
    assert pasted[8:] == [options.NO_MODEL if key.startswith("SD3 ControlNet") and name.endswith("_model") else None
                          for key, name in zip(keys[8:], pasted_back[8:], strict=True)]  # SD3 infotext, no unit: off


IMPORT_ONLY = """
import importlib, sys, types
shared = types.ModuleType("modules.shared")
shared.opts = types.SimpleNamespace(data={})
shared.cmd_opts = types.SimpleNamespace(sd3_mixdq="w8a8")  # --sd3-mixdq: written to the setting at registration
sys.modules["modules"] = types.ModuleType("modules")
sys.modules["modules"].__path__ = []
sys.modules["modules.shared"] = sys.modules["modules"].shared = shared
from lib_sd3.webui import hooks, startup
from lib_sd3.webui.registry import REGISTRY
for name in startup.FEATURE_MODULES:
    assert isinstance(importlib.import_module(name).DECLARED, hooks.Feature), name
lists = [n for n in dir(hooks) if n.isupper() and getattr(hooks, n)]
print(len(list(REGISTRY)), lists, shared.opts.data)
"""


def test_feature_modules_declare_and_do_nothing_at_import():
    """Importing every feature module (a fresh interpreter) registers no patch, adds no hook and writes no
    setting: start-up does, in its one order."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", IMPORT_ONLY], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "0 [] {}"


def test_registration_order_honours_after():
    a, b, c = (hooks.Feature(name, after=after) for name, after in (("a", ("c",)), ("b", ()), ("c", ("missing",))))
    assert [f.name for f in startup.in_order([a, b, c])] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="wait on each other"):
        startup.in_order([hooks.Feature("x", after=("y",)), hooks.Feature("y", after=("x",))])


def test_the_shipped_order_keeps_mixdq_outside_models_and_lora_after_mixdq():
    import importlib

    features = startup.in_order([importlib.import_module(n).DECLARED for n in startup.FEATURE_MODULES])
    names = [f.name for f in features]
    assert names.index("SD3.5 models") < names.index("MixDQ") < names.index("LoRA")


def test_slg_layers_offered_are_the_loaded_models_blocks(webui):
    module = load_script()
    assert module.slg_layer_choices() == [str(i) for i in range(38)]  # nothing loaded yet: the deepest family's
    mmdit = types.SimpleNamespace(joint_blocks=[object(), object()])
    loaded = Model("SD3", sd_checkpoint_info=None, model=types.SimpleNamespace(diffusion_model=mmdit))
    webui.module("modules.sd_models", model_data=types.SimpleNamespace(sd_model=loaded))
    assert module.slg_layer_choices() == ["0", "1"]
