"""The SD3 script's arguments from the UI (positional) and from the API (one dict)."""

import pytest

from lib_sd3.webui import script_args, settings
from lib_sd3.webui.script_args import USE_SETTING, ScriptArgError, parse, resolve

SLG_DEFAULTS = {"slg": USE_SETTING, "slg_layers": USE_SETTING, "slg_scale": USE_SETTING, "slg_start": USE_SETTING,
                "slg_end": USE_SETTING,
                **{a.name: USE_SETTING for a in script_args.ARGS if a.name.startswith("controlnet_")}}
UNIT_DEFAULTS = {a.name: a.setting_default for a in script_args.ARGS if a.setting_key is None}
"""ControlNet units have no setting: "setting" resolves to the unit's own default (off)."""


def test_api_dict_with_defaults_and_booleans():
    values = parse(({"mixdq": "w8a8", "nan_guard": False},))
    assert values == {"flow_samplers": "setting", "nan_guard": "off", "mixdq": "w8a8", **SLG_DEFAULTS}


def test_positional_ui_values():
    assert parse(("on", "off", "w4a8")) == {"flow_samplers": "on", "nan_guard": "off", "mixdq": "w4a8", **SLG_DEFAULTS}
    assert parse(()) == {a.name: a.default for a in script_args.ARGS}


def test_ui_default_labels_mean_the_setting():
    """The accordion shows "default (on)"; the UI sends that label, the API may send "setting" or "default"."""
    arg = script_args.BY_NAME["flow_samplers"]
    assert arg.default_label(True) == "default (on)"
    assert script_args.BY_NAME["nan_guard"].default_label(False) == "default (off)"
    assert script_args.BY_NAME["mixdq"].default_label("w8a8") == "default (w8a8)"
    assert script_args.BY_NAME["slg_layers"].default_label("7,8,9") == "default (7,8,9)"
    for word in ("default (on)", "default (off)", "default", "setting", None, ""):
        assert parse((word, word, word))["flow_samplers"] == USE_SETTING


def test_slg_values_are_typed():
    values = parse(({"slg": True, "slg_layers": "9, 7 8", "slg_scale": 2.5, "slg_start": "0.01", "slg_end": 0.2},))
    assert values["slg"] == "on"
    assert values["slg_layers"] == (7, 8, 9)
    assert values["slg_scale"] == 2.5 and values["slg_start"] == 0.01 and values["slg_end"] == 0.2
    assert parse(({"slg_layers": [1, 0]},))["slg_layers"] == (0, 1)
    assert parse(({"slg_layers": ["9", "7"]},))["slg_layers"] == (7, 9)  # the UI's multiselect
    assert parse(({"slg_layers": []},))["slg_layers"] == USE_SETTING
    assert parse(({"slg_start": 0.5, "slg_end": 0.2},))["slg_start"] == 0.5


@pytest.mark.parametrize("args, words", [
    (({"mixdqq": "w8a8"},), ["mixdqq", "known"]),
    (({"mixdq": "w2a2"},), ["w2a2", "allowed"]),
    (({"mixdq": "w9a9"},), ["mixdq", "w9a9", "allowed", "w8a8"]),
    (({"flow_samplers": "banana"},), ["flow_samplers", "banana", "allowed", "on", "off"]),
    (("x", 5), ["flow_samplers", "'x'", "allowed"]),
    (("on", 5), ["nan_guard", "5", "allowed"]),
    (("on",) * (len(script_args.ARGS) + 1), [f"at most {len(script_args.ARGS)}"]),
    (({"slg_layers": "seven"},), ["slg_layers", "seven", "joint-block indices"]),
    (({"slg_layers": [-1]},), ["slg_layers", ">= 0"]),
    (({"slg_layers": [True]},), ["slg_layers"]),
    (({"slg_scale": "big"},), ["slg_scale", "a number from 0 to 20"]),
    (({"slg_start": 1.5},), ["slg_start", "a number from 0 to 1"]),
    (({"slg": 1},), ["slg", "allowed"]),
])
def test_bad_args_name_the_problem(args, words):
    with pytest.raises(ScriptArgError) as error:
        parse(args)
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)


def test_resolve_uses_settings_for_setting():
    values = {"sd3_flow_samplers": True, "sd3_nan_guard": False, "sd3_mixdq": "w8a8", "sd3_slg": False,
              "sd3_slg_layers": "7,8,9", "sd3_slg_scale": 2.5, "sd3_slg_start": 0.01, "sd3_slg_end": 0.2}
    resolved = resolve(parse(({"nan_guard": "on", "slg_scale": 3},)), values.__getitem__)
    assert resolved == {"flow_samplers": True, "nan_guard": True, "mixdq": "w8a8", "slg": False,
                        "slg_layers": (7, 8, 9), "slg_scale": 3.0, "slg_start": 0.01, "slg_end": 0.2, **UNIT_DEFAULTS}
    assert resolved["controlnet_1_model"] == "None" and resolved["controlnet_1_image"] is None


def test_every_arg_has_a_setting_with_a_valid_default():
    no_setting = [arg.name for arg in script_args.ARGS if arg.setting_key is None]
    assert no_setting and all(name.startswith("controlnet_") for name in no_setting)  # a unit is off until picked
    for arg in script_args.ARGS:
        if arg.setting_key is None:
            arg.from_setting(arg.setting_default)
            continue
        setting = settings.BY_KEY[arg.setting_key]
        arg.from_setting(setting.default)  # raises if the shipped default is not an allowed value
        if arg.choices is not None and not arg.is_switch:
            assert setting.choices == arg.choices


@pytest.mark.parametrize("request_args, ok", [
    ([{"mixdq": "w8a8"}], True),
    ({"mixdq": "w8a8"}, False),  # A1111 indexes args by position: a bare dict must be in a list
    ([], True),
    ("on", False),
    ([{"mixdq": "w9a9"}], False),
    ([{"slg_start": 0.5, "slg_end": 0.2}], False),  # the API is told; the UI's crossed sliders guide no step
])
def test_check_request(request_args, ok):
    if ok:
        script_args.check_request({"args": request_args})
    else:
        with pytest.raises(ScriptArgError):
            script_args.check_request({"args": request_args})
