"""The SD3 LoRA adapter against stand-ins of A1111's Lora extension modules (networks / network / the Lora page)."""

from __future__ import annotations

import collections
import logging
import sys
import types

import pytest
import torch
from a1111.mmdit import TinyMMDiT
from a1111.models import Model
from feature_registration import registered
from safetensors.torch import save_file

from lib_sd3.webui.registry import REGISTRY


class Network:
    def __init__(self, name, network_on_disk):
        self.name, self.network_on_disk, self.modules = name, network_on_disk, {}


class RecordingModuleType:
    def create_module(self, net, weights):
        return weights if "lora_up.weight" in weights.w or "diff" in weights.w else None


class Page:
    """A1111's page builds an item per file; its own version filter does not know SD3, so it never hides here."""

    def create_item(self, name, index=None, enable_filter=True):
        return {"name": name, "sd_version": "SD1" if name.startswith("sd1") else "Unknown", "user_metadata": {}}


@pytest.fixture
def lora_webui(fake_webui, tmp_path):
    from safetensors.torch import load_file

    mmdit = TinyMMDiT(depth=2, dim=16)
    for name, module in mmdit.named_modules():
        module.network_layer_name = "diffusion_model_" + name.replace(".", "_")
    fake_webui.shared.sd_model = Model("SD3", diffusion_model=mmdit)
    fake_webui.shared.opts.data["lora_show_all"] = False
    fake_webui.module("modules.sd_models", read_state_dict=lambda filename: load_file(filename))
    original_calls = []

    def original_load(name, on_disk):
        original_calls.append(name)
        return "a1111"

    fake_webui.module("network", Network=Network,
                      NetworkWeights=collections.namedtuple("NetworkWeights", "network_key sd_key w sd_module"))
    def early_apply_weights(layer):  # the early branch's: backs up layer.weight unconditionally
        layer.backup = layer.weight.to("cpu", copy=True)

    fake_webui.module("networks", load_network=original_load, module_types=[RecordingModuleType()],
                      loaded_networks=[], available_networks={}, network_apply_weights=early_apply_weights)
    fake_webui.module("ui_extra_networks_lora", ExtraNetworksPageLora=Page)
    from lib_sd3.webui import lora

    registered(lora)
    REGISTRY.reapply(lora.DECLARED.retarget, sd3_loaded=True)  # as at app start
    REGISTRY.sync(True)
    fake_webui.mmdit, fake_webui.tmp, fake_webui.original_calls = mmdit, tmp_path, original_calls
    yield fake_webui
    REGISTRY.undo(lora.PATCH_LOAD)
    REGISTRY.undo(lora.PATCH_CARD)
    REGISTRY.undo(lora.PATCH_WEIGHTLESS)


def on_disk(path):
    return types.SimpleNamespace(filename=str(path), metadata={})


def write(tmp, name, tensors):
    path = tmp / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def test_sd3_lora_builds_a1111_modules_on_a1111_names(lora_webui, caplog):
    networks = sys.modules["networks"]
    path = write(lora_webui.tmp, "mixed", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 16),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(16, 2),
        "lora_unet_joint_blocks_1_x_block_mlp_fc2.lora_down.weight": torch.randn(2, 64),
        "lora_unet_joint_blocks_1_x_block_mlp_fc2.lora_up.weight": torch.randn(16, 2),
        "lora_unet_joint_blocks_1_x_block_mlp_fc2.alpha": torch.tensor(2.0),
        "lora_unet_nothing_here.alpha": torch.tensor(1.0),
    })
    with caplog.at_level(logging.INFO):
        net = networks.load_network("mixed", on_disk(path))
    assert set(net.modules) == {"diffusion_model_joint_blocks_0_x_block_attn_qkv", "diffusion_model_joint_blocks_1_x_block_mlp_fc2"}
    qkv = net.modules["diffusion_model_joint_blocks_0_x_block_attn_qkv"]
    assert qkv.w["lora_up.weight"].shape == (48, 2) and qkv.sd_module is lora_webui.mmdit.joint_blocks[0].x_block.attn.qkv
    lines = [r.getMessage() for r in caplog.records if "keys not applied" in r.getMessage()]
    assert len(lines) == 1 and "lora_unet_nothing_here.alpha" in lines[0]
    from lib_sd3.webui import routes

    report = routes.status()["features"]["LoRA"]["loras"]["mixed"]
    assert report["unmatched"] == 1 and report["modules"] == 2 and report["formats"] == ["diffusers", "kohya"]
    assert not lora_webui.original_calls


def test_other_models_and_our_failures_go_to_a1111(lora_webui, tmp_path):
    networks = sys.modules["networks"]
    lora_webui.shared.sd_model.is_sd3 = False
    assert networks.load_network("x", on_disk(tmp_path / "missing.safetensors")) == "a1111"
    lora_webui.shared.sd_model.is_sd3 = True
    assert networks.load_network("y", on_disk(tmp_path / "missing.safetensors")) == "a1111"  # ours raised
    assert lora_webui.original_calls == ["x", "y"]


def test_lora_tab_cards(lora_webui):
    networks = sys.modules["networks"]
    sd3 = write(lora_webui.tmp, "sd3style", {"lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(1.0)})
    sd1 = write(lora_webui.tmp, "sd1style", {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)})
    networks.available_networks.update({"sd3style": on_disk(sd3), "sd1style": on_disk(sd1)})
    page = Page()
    assert page.create_item("sd3style")["sd_version"] == "SD3"
    assert page.create_item("sd1style") is None  # SD3 loaded, compatible only
    assert page.create_item("sd1style", enable_filter=False)["sd_version"] == "SD1"
    lora_webui.shared.sd_model = Model("SD1")
    assert page.create_item("sd3style") is None  # an SD1 model hides SD3 LoRAs
    assert page.create_item("sd3style", enable_filter=False)["sd_version"] == "SD3"
    assert page.create_item("sd1style")["sd_version"] == "SD1"


def test_unmerge_restores_a1111_backups_without_grad(lora_webui):
    from lib_sd3.webui import lora

    layer = lora_webui.mmdit.joint_blocks[0].x_block.attn.qkv
    backup = layer.weight.detach().clone()
    layer.weight.data += 1
    layer.network_current_names = (("a", 1.0, 1.0, None),)

    def restore(module):
        module.weight.copy_(backup)

    sys.modules["networks"].network_restore_weights_from_backup = restore
    lora.unmerge(lora_webui.mmdit)
    assert torch.equal(layer.weight, backup) and layer.network_current_names == ()


def test_weightless_norms_are_skipped_not_crashed(lora_webui):
    networks = sys.modules["networks"]
    norm = lora_webui.mmdit.joint_blocks[0].x_block.norm1  # LayerNorm(elementwise_affine=False): weight None
    assert norm.weight is None
    networks.network_apply_weights(norm)  # the early branch would raise 'NoneType' object has no attribute 'to'
    layer = lora_webui.mmdit.context_embedder
    networks.network_apply_weights(layer)
    assert torch.equal(layer.backup, layer.weight)


def test_unreadable_file_loads_empty_with_one_line(lora_webui, caplog):
    """A truncated file: no exception for A1111 to print, one line, and the LoRA named as not applied."""
    from lib_sd3.webui import infotext, lora, routes

    networks = sys.modules["networks"]
    good = write(lora_webui.tmp, "whole", {"lora_unet_x_embedder_proj.alpha": torch.tensor(1.0),
                                            "lora_unet_context_embedder.lora_down.weight": torch.randn(2, 16),
                                            "lora_unet_context_embedder.lora_up.weight": torch.randn(16, 2)})
    cut = lora_webui.tmp / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-40])
    with caplog.at_level(logging.INFO):
        net = networks.load_network("cut", on_disk(cut))
    assert net.modules == {} and getattr(net, lora.NOT_APPLIED_ATTR).startswith("unreadable file")
    lines = [r for r in caplog.records if "cut" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "not applied" in lines[0].getMessage()
    report = routes.status()["features"]["LoRA"]["loras"]["cut"]
    assert report["applied"] is False and report["error"].startswith("unreadable file")
    assert not lora_webui.original_calls  # A1111's loader would only raise on the same read

    networks.loaded_networks[:] = [net]
    p = types.SimpleNamespace(extra_generation_params={})
    lora.note_not_applied(p)
    assert p.extra_generation_params == {infotext.LORA_NOT_APPLIED: "cut"}


def test_lora_that_matches_nothing_is_said_not_applied(lora_webui, caplog):
    from lib_sd3.webui import infotext, lora, routes

    networks = sys.modules["networks"]
    sd15 = write(lora_webui.tmp, "sd15", {  # an SD1.5 LoRA on an SD3 model
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 16),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(16, 2)})
    fits = write(lora_webui.tmp, "fits", {"lora_unet_joint_blocks_1_x_block_mlp_fc2.lora_down.weight": torch.randn(2, 64),
                                          "lora_unet_joint_blocks_1_x_block_mlp_fc2.lora_up.weight": torch.randn(16, 2)})
    with caplog.at_level(logging.INFO):
        nothing = networks.load_network("sd15", on_disk(sd15))
        something = networks.load_network("fits", on_disk(fits))
    lines = [r.getMessage() for r in caplog.records if "sd15" in r.getMessage()]
    assert len(lines) == 1 and lora.NOTHING_MATCHES in lines[0] and "not applied" in lines[0], lines
    assert routes.status()["features"]["LoRA"]["loras"]["sd15"]["applied"] is False
    assert routes.status()["features"]["LoRA"]["loras"]["fits"]["applied"] is True
    nothing.mentioned_name = "sd15_alias"
    networks.loaded_networks[:] = [something, nothing]
    p = types.SimpleNamespace(extra_generation_params={})
    lora.note_not_applied(p)
    assert p.extra_generation_params == {infotext.LORA_NOT_APPLIED: "sd15_alias"}
    networks.loaded_networks[:] = [something]
    lora.note_not_applied(p)
    assert p.extra_generation_params == {}


def test_checkpoint_load_puts_text_encoder_lora_back_first(lora_webui):
    """The early SD3 branch reads CLIP once per model, and A1111's Lora extension drops its backups on every
    load_state_dict without restoring: a merged text-encoder LoRA would outlive a checkpoint switch."""
    from lib_sd3.webui import models

    registered(models)
    clip = torch.nn.Linear(4, 4)
    base = clip.weight.detach().clone()
    model = torch.nn.Module()
    model.is_sd3, model.cond_stage_model, model.model = True, torch.nn.Module(), torch.nn.Module()
    model.cond_stage_model.clip_l = clip

    def merge(layer):  # A1111's network_apply_weights with one LoRA wanted: backup, then W += delta
        layer.network_weights_backup = layer.weight.detach().clone()
        with torch.no_grad():
            layer.weight += 1
        layer.network_current_names = (("te_lora", 1.0, 1.0, None),)

    def restore(layer):
        layer.weight.copy_(layer.network_weights_backup)

    def a1111_load_model_weights(model, checkpoint_info, state_dict, timer):  # the checkpoint has no CLIP keys
        for module in model.modules():  # A1111's network_reset_cached_weight, from its _load_from_state_dict patch
            module.network_current_names, module.network_weights_backup = (), None

    sys.modules["networks"].network_restore_weights_from_backup = restore
    lora_webui.module("modules.sd_models", load_model_weights=a1111_load_model_weights,
                      reload_model_weights=lambda **kw: None, get_checkpoint_state_dict=lambda *a: {},
                      select_checkpoint=lambda: None)
    assert REGISTRY.apply(models.LOADING.name).value == "applied"
    try:
        import modules.sd_models

        merge(clip)
        modules.sd_models.load_model_weights(model, types.SimpleNamespace(filename="other.safetensors"), {}, None)
        assert torch.equal(clip.weight, base) and clip.network_current_names == ()
        merge(clip)  # the LoRA used again after the switch: added once, not twice
        assert torch.equal(clip.weight, base + 1)
    finally:
        REGISTRY.undo(models.LOADING.name)
