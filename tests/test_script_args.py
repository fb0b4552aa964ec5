"""The SD3 script's arguments from the UI (positional) and from the API (one dict)."""

import pytest

from lib_sd3.webui import script_args
from lib_sd3.webui.script_args import ScriptArgError, parse, resolve


def test_api_dict_with_defaults_and_booleans():
    values = parse(({"mixdq": "w8a8", "nan_guard": False},))
    assert values == {"flow_samplers": "setting", "nan_guard": "off", "mixdq": "w8a8"}


def test_positional_ui_values():
    assert parse(("on", "off", "w4a8")) == {"flow_samplers": "on", "nan_guard": "off", "mixdq": "w4a8"}
    assert parse(()) == {a.name: a.default for a in script_args.ARGS}


@pytest.mark.parametrize("args, words", [
    (({"mixdqq": "w8a8"},), ["mixdqq", "known"]),
    (({"mixdq": "w2a2"},), ["w2a2", "allowed"]),
    (("on", "on", "off", "extra"),  ["at most 3"]),
])
def test_bad_args_name_the_problem(args, words):
    with pytest.raises(ScriptArgError) as error:
        parse(args)
    for word in words:
        assert word in str(error.value)


def test_resolve_uses_settings_for_setting():
    settings = {"sd3_flow_samplers": True, "sd3_nan_guard": False, "sd3_mixdq": "w8a8"}
    resolved = resolve(parse(({"nan_guard": "on"},)), settings.__getitem__)
    assert resolved == {"flow_samplers": True, "nan_guard": True, "mixdq": "w8a8"}
