"""Bad SD3 args from the API: HTTP 422 with one line, before A1111 builds the script args."""

from __future__ import annotations

import logging
import types

import pytest
from fastapi import HTTPException

from lib_sd3 import LOGGER_NAME
from lib_sd3.patching import AttributeSwap
from lib_sd3.webui import api_args


class Api:
    """A1111's ``modules.api.api.Api.init_script_args`` signature (dev and the early SD3 branch)."""

    def __init__(self) -> None:
        self.calls = 0

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *,
                         input_script_args=None):
        self.calls += 1
        return list(default_script_args)


@pytest.fixture
def api(monkeypatch, caplog):
    swap = AttributeSwap(Api, "init_script_args", api_args.make_init_script_args)
    swap.apply()
    monkeypatch.setattr(api_args, "CHECKS", [])
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    yield Api()
    logger.removeHandler(caplog.handler)
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

    monkeypatch.setattr(api_args, "CHECKS", [check])
    with pytest.raises(HTTPException) as error:
        api.init_script_args(request([{"slg": "on", "slg_layers": "9"}]), [], None, 0, object())
    assert "0..1" in error.value.detail and seen == [(9,)]
