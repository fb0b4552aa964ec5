"""The SD3-family construction and checked-loading patches against stand-in A1111 modules.

The stand-in ``BaseModel`` (tests/a1111/sd3.py) builds what A1111's does: depth, patch, widths from shapes, but never
qk-norm or MMDiT-X, in a class of its own (``A1111MMDiT``). ``load_model_weights`` loads with ``strict=False`` as
A1111's does. The real
A1111 runs the same patches in tests/webui/test_real_sd35.py.
"""

from __future__ import annotations

import types

import pytest
import torch
from a1111 import sd3 as a1111_sd3
from a1111.processing import P
from a1111.sd3 import A1111BaseModel, A1111MMDiT, A1111QkvLinear, Inferencer
from feature_registration import registered
from safetensors.torch import load_file

from lib_sd3.models.families import CheckpointError, detect, shapes_of
from lib_sd3.models.mmdit import MMDiT
from lib_sd3.models.mmdit_load import KeyMismatchError
from lib_sd3.webui import hooks
from lib_sd3.webui.registry import REGISTRY
from tests import tiny_sd35


@pytest.fixture
def webui(fake_webui, tmp_path):
    from lib_sd3.webui import models

    registered(models)
    calls = []

    def load_model_weights(model, checkpoint_info, state_dict, timer):
        calls.append(("load", checkpoint_info.filename))
        model.load_state_dict(state_dict, strict=False)

    def get_checkpoint_state_dict(checkpoint_info, timer):
        return load_file(checkpoint_info.filename)

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        calls.append(("reload", info.filename))

    a1111_sd3.install_construction(fake_webui)
    fake_webui.module("modules.sd_models", load_model_weights=load_model_weights, select_checkpoint=lambda: None,
                      get_checkpoint_state_dict=get_checkpoint_state_dict, reload_model_weights=reload_model_weights)
    files = {}
    for name in tiny_sd35.SHAPES:
        files[name] = tmp_path / f"{name}.safetensors"
        files[name + ":ref"] = tiny_sd35.write_checkpoint(files[name], name, seed=3)
    for patch in (models.CONSTRUCTION, models.LOADING):
        assert REGISTRY.apply(patch.name).value == "applied", patch.reason
    fake_webui.calls, fake_webui.files = calls, files
    yield fake_webui


def _info(path):
    return types.SimpleNamespace(filename=str(path))


def _output(model, reference=None):
    x, context, pooled = tiny_sd35.inputs()
    t = torch.full((x.shape[0],), 600.0)
    with torch.no_grad():
        ours = model.model.diffusion_model(x, t, y=pooled, context=context)
        if reference is None:
            return ours, None
        return ours, reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                               timestep=t).sample


def _load(webui, model, name):
    import modules.sd_models

    modules.sd_models.load_model_weights(model, _info(webui.files[name]), load_file(webui.files[name]), None)


def test_construction_builds_our_mmdit_for_every_family(webui):
    medium = Inferencer(load_file(webui.files["sd3.5-medium"]))
    mmdit = medium.model.diffusion_model
    assert type(mmdit) is MMDiT and hasattr(mmdit.joint_blocks[0].x_block, "attn2")
    assert type(mmdit.joint_blocks[0].x_block.attn.qkv) is A1111QkvLinear  # A1111's LoRA type-checks it
    assert medium.model.model_sampling.shift == 3.0
    sd3 = Inferencer(load_file(webui.files["sd3-medium"]))
    assert isinstance(sd3.model, A1111BaseModel) and type(sd3.model).__mro__[1] is A1111BaseModel
    assert type(sd3.model.diffusion_model) is MMDiT and sd3.model.diffusion_model.config.qk_norm is None
    assert type(sd3.model.diffusion_model.joint_blocks[0].x_block.attn.qkv) is A1111QkvLinear


@pytest.mark.parametrize("first, second", [("sd3-medium", "sd3.5-large"), ("sd3.5-large", "sd3.5-medium"),
                                           ("sd3.5-medium", "sd3-medium")])
def test_switching_family_rebuilds_and_matches_diffusers(webui, first, second):
    model = Inferencer(load_file(webui.files[first]))
    _load(webui, model, first)
    assert model.sd3_family.name == first
    _load(webui, model, second)
    assert model.sd3_family.name == second
    ours, reference = _output(model, webui.files[second + ":ref"])
    assert (ours - reference).abs().max().item() < 1e-4


def test_missing_keys_are_refused_before_anything_changes(webui, tmp_path):
    from safetensors.torch import save_file

    model = Inferencer(load_file(webui.files["sd3.5-large"]))
    _load(webui, model, "sd3.5-large")
    before, _ = _output(model)
    broken = load_file(webui.files["sd3.5-medium"])
    del broken["model.diffusion_model.final_layer.linear.bias"]
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    import modules.sd_models

    with pytest.raises(KeyMismatchError, match=r"broken.safetensors: SD3.5 Medium checkpoint does not fit its "
                                               r"MMDiT: 1 missing \(first: model.diffusion_model.final_layer"):
        modules.sd_models.load_model_weights(model, _info(path), load_file(path), None)
    after, _ = _output(model)
    assert torch.equal(before, after) and model.sd3_family.name == "sd3.5-large"
    with pytest.raises(KeyMismatchError):
        modules.sd_models.reload_model_weights(info=_info(path))
    assert ("reload", str(path)) not in webui.calls


def test_truncated_file_is_refused_before_a1111_reloads(webui, tmp_path):
    import modules.sd_models

    data = webui.files["sd3.5-large"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        modules.sd_models.reload_model_weights(info=_info(cut))
    assert webui.calls == []
    modules.sd_models.reload_model_weights(info=_info(webui.files["sd3.5-large"]))
    assert webui.calls == [("reload", str(webui.files["sd3.5-large"]))]


def test_status_and_infotext_name_the_family(webui):
    from lib_sd3.webui import models

    model = Inferencer(load_file(webui.files["sd3.5-medium"]))
    _load(webui, model, "sd3.5-medium")
    webui.shared.sd_model = model
    assert hooks.STATUS[models.FEATURE]() == {
        "family": "sd3.5-medium", "label": "SD3.5 Medium", "turbo_from": None, "mmdit": "sd-webui-sd3",
        "depth": 3, "qk_norm": "rms", "mmdit_x_layers": [0, 1]}
    p = P(sd_model=model)
    models.process(p, {})
    assert p.extra_generation_params == {"SD3 family": "SD3.5 Medium"}


def test_undo_puts_a1111_back(webui):
    import modules.models.sd3.sd3_model as sd3_model
    import modules.sd_models as sd_models

    from lib_sd3.webui import models

    assert sd3_model.BaseModel is not A1111BaseModel
    REGISTRY.undo(models.CONSTRUCTION.name)
    REGISTRY.undo(models.LOADING.name)
    assert sd3_model.BaseModel is A1111BaseModel
    assert sd_models.load_model_weights.__name__ == "load_model_weights" and \
        not hasattr(sd_models.load_model_weights, "__sd3_original__")


@pytest.mark.parametrize("name", ["sd3.5-large", "sd3-medium"])
def test_a_model_a1111_built_is_rebuilt_at_load(webui, name):
    """Construction patch missing (say, a future A1111 renamed BaseModel): the load still gets our MMDiT."""
    from lib_sd3.webui import models

    REGISTRY.undo(models.CONSTRUCTION.name)
    model = Inferencer(load_file(webui.files[name]))
    assert type(model.model) is A1111BaseModel and type(model.model.diffusion_model) is A1111MMDiT
    _load(webui, model, name)
    ours, reference = _output(model, webui.files[name + ":ref"])
    assert type(model.model.diffusion_model) is MMDiT
    assert model.model.diffusion_model.config == detect(shapes_of(load_file(webui.files[name]))).config
    assert (ours - reference).abs().max().item() < 1e-4


class A1111Options:
    """A1111's ``Options.set``: an exception from the option's onchange (the model load) is printed and swallowed."""

    def __init__(self, onchange):
        self.data, self.onchange, self.displayed = {"sd_model_checkpoint": "good"}, onchange, []

    def set(self, key, value, is_api=False, run_callbacks=True):
        old = self.data.get(key)
        if old == value:
            return False
        self.data[key] = value
        if run_callbacks:
            try:
                self.onchange()
            except Exception as e:  # A1111: errors.display(e, ...) -- a full traceback -- then the old value back
                self.displayed.append(e)
                self.data[key] = old
                return False
        return True


def test_refused_checkpoint_option_is_an_api_error_and_one_line(webui, tmp_path, caplog):
    import logging

    from fastapi import HTTPException

    from lib_sd3.webui import models

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(webui.files["sd3.5-large"].read_bytes()[:-100])
    aliases = {"cut": _info(cut), "good": _info(webui.files["sd3.5-large"])}
    loads = []
    opts = A1111Options(lambda: loads.append(opts.data["sd_model_checkpoint"]))
    webui.module("modules.options", Options=A1111Options)
    webui.module("modules.sd_models", checkpoint_aliases=aliases)
    assert REGISTRY.apply(models.CHECKPOINT_OPTION_CHECK.name).value == "applied"
    try:
        with caplog.at_level(logging.INFO), pytest.raises(HTTPException) as refused:  # POST /sdapi/v1/options
            opts.set("sd_model_checkpoint", "cut", is_api=True)
        assert refused.value.status_code == 422 and "cut.safetensors" in refused.value.detail
        assert "truncated" in refused.value.detail
        assert opts.set("sd_model_checkpoint", "cut") is False  # the settings UI: the dropdown shows the old value
        assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 2  # one line each
        assert len(caplog.records) == 2 and "the previous model stays loaded" in caplog.records[0].getMessage()
        assert opts.data["sd_model_checkpoint"] == "good" and loads == [] and opts.displayed == []
        opts.data["sd_model_checkpoint"] = "other"
        assert opts.set("sd_model_checkpoint", "good", is_api=True) is True and loads == ["good"]
        assert opts.set("sd_model_checkpoint", "cut", run_callbacks=False) is True  # override_settings: left to reload
    finally:
        REGISTRY.undo(models.CHECKPOINT_OPTION_CHECK.name)
    assert A1111Options.set.__name__ == "set" and not hasattr(A1111Options.set, "__sd3_original__")
