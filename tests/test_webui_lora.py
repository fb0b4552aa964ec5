"""The SD3 LoRA adapter against stand-ins of A1111's Lora extension modules (networks / network / the Lora page)."""

from __future__ import annotations

import collections
import logging
import sys
import types

import pytest
import torch
from feature_registration import registered
from safetensors.torch import save_file
from tiny_mmdit import TinyMMDiT

from lib_sd3.webui.registry import REGISTRY

EXTENSION_MODULES = ("networks", "network", "ui_extra_networks_lora")


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
    fake_webui.shared.sd_model = types.SimpleNamespace(is_sd3=True, is_sd1=False, model=types.SimpleNamespace(diffusion_model=mmdit))
    fake_webui.shared.opts.data["lora_show_all"] = False
    fake_webui.module("modules.sd_models", read_state_dict=lambda filename: load_file(filename))
    saved = {name: sys.modules.get(name) for name in EXTENSION_MODULES}
    original_calls = []

    def original_load(name, on_disk):
        original_calls.append(name)
        return "a1111"

    sys.modules["network"] = types.SimpleNamespace(
        Network=Network, NetworkWeights=collections.namedtuple("NetworkWeights", "network_key sd_key w sd_module"))
    def early_apply_weights(layer):  # the early branch's: backs up layer.weight unconditionally
        layer.backup = layer.weight.to("cpu", copy=True)

    sys.modules["networks"] = types.SimpleNamespace(load_network=original_load, module_types=[RecordingModuleType()],
                                                    loaded_networks=[], available_networks={},
                                                    network_apply_weights=early_apply_weights)
    sys.modules["ui_extra_networks_lora"] = types.SimpleNamespace(ExtraNetworksPageLora=Page)
    from lib_sd3.webui import lora

    registered(lora)
    REGISTRY.reapply(lora.DECLARED.retarget, sd3_loaded=True)  # as at app start
    REGISTRY.sync(True)
    fake_webui.mmdit, fake_webui.tmp, fake_webui.original_calls = mmdit, tmp_path, original_calls
    yield fake_webui
    REGISTRY.undo(lora.PATCH_LOAD)
    REGISTRY.undo(lora.PATCH_CARD)
    REGISTRY.undo(lora.PATCH_WEIGHTLESS)
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


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
    lora_webui.shared.sd_model = types.SimpleNamespace(is_sd3=False, is_sd1=True)
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
