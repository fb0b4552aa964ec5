"""MixDQ on a ControlNet follows the base: the config's image-stream rules on the ControlNet's blocks, undone bit
for bit when the base goes back to float."""

from __future__ import annotations

import pytest
import torch

from lib_sd3.controlnet.load import load_controlnet
from lib_sd3.controlnet.quantize import controlnet_key, follow_base, for_controlnet
from lib_sd3.mixdq import config as mixdq_config
from lib_sd3.mixdq import model as mixdq_model
from tests import tiny_controlnet, tiny_sd35

LAYERS = ("adaLN_modulation.1", "attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")


@pytest.fixture
def models(tmp_path):
    tiny_controlnet.write_base(tmp_path / "base.safetensors")
    tiny_controlnet.write_controlnet(tmp_path / "canny.safetensors")
    _, base = tiny_sd35.load_mmdit(tmp_path / "base.safetensors")
    _, controlnet = load_controlnet(tmp_path / "canny.safetensors")
    return base, controlnet


def run(controlnet) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    hidden = controlnet.config.hidden_size
    tokens = torch.randn(2, 64, hidden, generator=generator)
    t = torch.tensor([500.0, 500.0])
    pooled = torch.randn(2, controlnet.config.pooled_dim, generator=generator)
    with torch.no_grad():
        return controlnet(tokens, tiny_controlnet.control_latent(size=16).expand(2, -1, -1, -1), t, pooled)


def test_keys_that_carry_over():
    assert controlnet_key("joint_blocks.*.x_block.attn.qkv") == "transformer_blocks.*.attn.qkv"
    assert controlnet_key("joint_blocks.*.*_block.mlp.fc1") == "transformer_blocks.*.mlp.fc1"
    assert controlnet_key("joint_blocks.*.context_block.attn.qkv") is None  # no text stream in the ControlNet
    assert controlnet_key("joint_blocks.3.x_block.attn.qkv") is None  # one block of the base: not the ControlNet's
    config = for_controlnet(mixdq_config.load("w8a8"))
    attn2 = {"transformer_blocks.*.attn2.qkv", "transformer_blocks.*.attn2.proj"}  # MMDiT-X rules: match nothing here
    assert set(config.weight) == {f"transformer_blocks.*.{layer}" for layer in LAYERS} | attn2
    assert set(config.act) == {f"transformer_blocks.*.{layer}" for layer in LAYERS if layer != "adaLN_modulation.1"} | attn2


def test_follows_the_base_and_restores_bit_for_bit(models):
    base, controlnet = models
    before = run(controlnet)
    assert follow_base(controlnet, base) is None and mixdq_model.state(controlnet) is None  # float base: float
    mixdq_model.quantize(base, mixdq_config.load("w8a8"))
    assert follow_base(controlnet, base) == "w8a8 (ControlNet)"
    state = mixdq_model.state(controlnet)
    assert sorted(state.originals) == sorted(f"transformer_blocks.{i}.{layer}" for i in range(2) for layer in LAYERS)
    quantized = run(controlnet)
    assert any(not torch.equal(a, b) for a, b in zip(quantized, before, strict=True))
    mixdq_model.restore(base)
    assert follow_base(controlnet, base) is None and mixdq_model.state(controlnet) is None
    assert all(torch.equal(a, b) for a, b in zip(run(controlnet), before, strict=True))


def test_quantized_as_a_config_written_for_the_controlnet(models, tmp_path):
    """The moved rules are exactly a config a user would write with the ControlNet's own names."""
    base, controlnet = models
    mixdq_model.quantize(base, mixdq_config.load("w4a8"))
    follow_base(controlnet, base)
    moved = run(controlnet)
    _, twin = load_controlnet(tmp_path / "canny.safetensors")
    shipped = mixdq_config.load("w4a8")
    written = mixdq_config.from_dict({
        "name": "by hand", "act_mode": shipped.act_mode, "group_size": shipped.group_size,
        "weight": {f"transformer_blocks.*.{layer}": shipped.weight.get(f"joint_blocks.*.x_block.{layer}",
                                                                       shipped.weight[f"joint_blocks.*.*_block.{layer}"])
                   for layer in LAYERS},  # the image stream's own rule first, as the base's matcher reads it
        "act": {f"transformer_blocks.*.{layer}": 8 for layer in LAYERS if layer != "adaLN_modulation.1"}})
    mixdq_model.quantize(twin, written)
    assert all(torch.equal(a, b) for a, b in zip(run(twin), moved, strict=True))
