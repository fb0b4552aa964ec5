"""Bad SD3 args from the API: HTTP 422 with one line, before A1111 builds the script args."""

from __future__ import annotations

import logging
import types

import pytest
from fastapi import HTTPException

from lib_sd3 import LOGGER_NAME
from lib_sd3.patching import AttributeSwap
from lib_sd3.webui import api_args, hooks


class Api:
    """A1111's ``modules.api.api.Api.init_script_args`` signature (dev and the early SD3 branch)."""

    def __init__(self) -> None:
        self.calls = 0

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *,
                         input_script_args=None):
        self.calls += 1
        return list(default_script_args)

    def apply_infotext(self, request, tabname, *, script_runner=None, mentioned_script_args=None):
        """A1111's: the infotext's settings become overrides, unless the request sets them itself."""
        if request.override_settings is None:
            request.override_settings = {}
        for key, value in SETTING_LABELS.items():
            pasted = parse_generation_parameters(request.infotext).get(value)
            if pasted is not None and key not in request.override_settings:
                request.override_settings[key] = {"True": True, "False": False}.get(pasted, pasted)  # cast_value
        return {}


SETTING_LABELS = {"sd3_mixdq": "SD3 MixDQ", "sd3_nan_guard": "SD3 NaN guard"}


def parse_generation_parameters(text):
    """``infotext_utils.parse_generation_parameters`` for ``Key: value, Key: value`` lines."""
    return dict(part.split(": ", 1) for part in text.split(", "))


@pytest.fixture
def api(monkeypatch, caplog):
    swap = AttributeSwap(Api, "init_script_args", api_args.make_init_script_args)
    swap.apply()
    pasted = AttributeSwap(Api, "apply_infotext", api_args.make_apply_infotext)
    pasted.apply()
    monkeypatch.setattr(hooks, "API_CHECKS", [])
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    yield Api()
    logger.removeHandler(caplog.handler)
    pasted.undo()
    swap.undo()


def request(args=None, name="SD3", **scripts):
    entry = {} if args is None else {"args": args}
    return types.SimpleNamespace(alwayson_scripts={name: entry, **scripts})


@pytest.mark.parametrize("req, words", [
    (request([{"mixdq": "w9a9"}]), ["mixdq", "w9a9", "allowed", "w8a8"]),
    (request([{"flow_samplers": "banana"}]), ["flow_samplers", "banana", "allowed"]),
    (request(["x", 5]), ["flow_samplers", "'x'", "allowed"]),
    (request([{"no_such_key": 1}]), ["no_such_key", "known"]),
    (request([{"slg_layers": "7,eight"}], name="sd3"), ["slg_layers", "joint-block indices"]),
    (request("on"), ["must be a list"]),
])
def test_bad_args_are_422_with_one_line_and_nothing_runs(api, caplog, req, words):
    with pytest.raises(HTTPException) as error:
        api.init_script_args(req, [None] * 4, None, 0, object(), input_script_args={})
    assert error.value.status_code == 422
    detail = error.value.detail
    assert "\n" not in detail
    for word in words:
        assert word in detail
    assert api.calls == 0  # A1111's own step (and so the generation) never ran
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and detail in lines[0]


@pytest.mark.parametrize("req", [
    request([{"mixdq": "w8a8", "slg": True, "slg_layers": [0]}]),
    request(["on", "default (off)", "setting"]),
    request(),  # the script named without args
    types.SimpleNamespace(alwayson_scripts=None),
    types.SimpleNamespace(alwayson_scripts={"ADetailer": {"args": ["anything"]}}),
])
def test_good_or_absent_args_pass_through(api, caplog, req):
    assert api.init_script_args(req, [1, 2], None, 0, object(), input_script_args={}) == [1, 2]
    assert api.calls == 1
    assert caplog.records == []


def test_model_checks_run_on_resolved_args(api, monkeypatch):
    seen = []

    def check(resolved):
        seen.append(resolved["slg_layers"])
        return "SD3 script arg slg_layers: [9] are outside this model's joint blocks 0..1"

    monkeypatch.setattr(hooks, "API_CHECKS", [check])
    with pytest.raises(HTTPException) as error:
        api.init_script_args(request([{"slg": "on", "slg_layers": "9"}]), [], None, 0, object())
    assert "0..1" in error.value.detail and seen == [(9,)]


# --- every way a value arrives (alwayson_scripts shapes, override_settings, the infotext field) -------------

def raw(entry, **fields):
    return types.SimpleNamespace(alwayson_scripts={"SD3": entry}, **fields)


@pytest.mark.parametrize("req, words", [
    (raw({"args": None}), ["must be a list", "None"]),  # A1111 alone: HTTP 500 with a TypeError
    (raw(None), ["alwayson_scripts SD3", "None"]),  # A1111 alone: HTTP 500
    (raw([{"mixdq": "w8a8"}]), ["alwayson_scripts SD3", "\"args\""]),  # A1111 alone: silently ignored
    (raw({"args": [{"mixdq": "w8a8"}, "on"]}), ["one dict and nothing after it", "'on'"]),  # ignored too
    (raw({"arg": [{"mixdq": "w8a8"}]}), ["only \"args\"", "arg"]),
    (types.SimpleNamespace(alwayson_scripts=None, override_settings={"sd3_mixdq": "int4"}),
     ["sd3_mixdq", "int4", "allowed", "w8a8"]),
    (types.SimpleNamespace(alwayson_scripts=None, override_settings={"sd3_slg_layers": "abc"}),
     ["sd3_slg_layers", "abc", "joint-block indices"]),
    (types.SimpleNamespace(alwayson_scripts=None, override_settings={"sd3_slg_scale": 99}), ["sd3_slg_scale", "99"]),
])
def test_every_arrival_path_is_checked(api, caplog, req, words):
    with pytest.raises(HTTPException) as error:
        api.init_script_args(req, [None] * 4, None, 0, object(), input_script_args={})
    assert error.value.status_code == 422 and "\n" not in error.value.detail
    for word in words:
        assert word in error.value.detail
    assert api.calls == 0
    assert len(caplog.records) == 1


def test_a_huge_bad_value_is_quoted_short(api):
    with pytest.raises(HTTPException) as error:
        api.init_script_args(request([{"mixdq": "x" * 200_000}]), [], None, 0, object())
    assert "200002 characters" in error.value.detail and len(error.value.detail) < 300


def test_a_pasted_infotext_naming_a_config_not_here_is_one_warning_and_the_setting(api, caplog):
    """A1111's ``apply_infotext`` turns ``SD3 MixDQ: int4`` (an image made with a custom config) into an
    override of ``sd3_mixdq``: not the client's mistake. The override goes; the setting's value is used."""
    req = types.SimpleNamespace(alwayson_scripts=None, infotext="Steps: 20, SD3 MixDQ: int4, SD3 NaN guard: False",
                                override_settings={"CLIP_stop_at_last_layers": 2})
    api.apply_infotext(req, "txt2img")
    assert req.override_settings == {"CLIP_stop_at_last_layers": 2, "sd3_nan_guard": False}
    assert api.init_script_args(req, [1], None, 0, object()) == [1]
    assert api.calls == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "int4" in lines[0] and "setting" in lines[0]


def test_the_clients_own_override_is_still_refused_beside_an_infotext(api):
    req = types.SimpleNamespace(alwayson_scripts=None, infotext="Steps: 20, SD3 MixDQ: int4",
                                override_settings={"sd3_mixdq": "int4"})
    api.apply_infotext(req, "txt2img")
    with pytest.raises(HTTPException):
        api.init_script_args(req, [1], None, 0, object())


def test_good_overrides_pass_and_reach_the_model_checks(api, monkeypatch):
    seen = []
    monkeypatch.setattr(hooks, "API_CHECKS", [lambda resolved: seen.append(resolved["slg_layers"])])
    req = types.SimpleNamespace(alwayson_scripts=None, override_settings={"sd3_slg_layers": "3, 1", "sd3_slg": True})
    assert api.init_script_args(req, [1], None, 0, object()) == [1]
    assert seen == [(1, 3)]
