"""Bit configs: loading, validation, clear errors, the shipped files and the diffusers name map."""

import pytest
import torch
import yaml
from tiny_mmdit import TinyMMDiT

from lib_sd3.mixdq import config, layers, presets
from lib_sd3.mixdq.config import ConfigError


def tiny_diffusers(depth=2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=depth, attention_head_dim=32,
                                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                                 pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8)


def test_shipped_files_are_the_rules_for_sd3_medium():
    for kind in config.SHIPPED:
        assert config.load(kind) == presets.preset(kind, presets.sd3_medium_linears())


def test_shipped_configs_fit_a_depth_24_model_in_both_namings():
    a1111 = TinyMMDiT(depth=24, dim=64)
    diffusers = tiny_diffusers(depth=24)
    medium = presets.sd3_medium_linears()
    assert {n for n, _ in layers.linear_layers(a1111)} == set(medium)
    for kind in config.SHIPPED:
        cfg = config.load(kind)
        plan_a = config.resolve(cfg, a1111)
        plan_d = config.resolve(cfg, diffusers)
        assert set(plan_a) == set(cfg.weight)
        # diffusers splits each fused qkv into three Linears
        qkv = sum(1 for n in cfg.weight if n.endswith("attn.qkv"))
        assert len(plan_d) == len(plan_a) + 2 * qkv
        assert {layers.canonical_name(n) for n in plan_d} == set(plan_a)
        for name, plan in plan_d.items():
            assert plan == plan_a[layers.canonical_name(name)]


def test_text_stream_layers_are_bos_aware():
    plan = config.resolve(config.load("w8a8"), tiny_diffusers(depth=24))
    assert plan["transformer_blocks.3.attn.add_k_proj"].float_rows == 1
    assert plan["transformer_blocks.3.ff_context.net.2"].float_rows == 1
    assert plan["transformer_blocks.3.attn.to_k"].float_rows == 0
    assert plan["transformer_blocks.3.norm1.linear"].act_mode == "float"  # adaLN: one row per image
    assert plan["transformer_blocks.3.ff.net.0.proj"].act_mode == "dynamic"


def test_names_the_model_lacks_are_listed():
    model = TinyMMDiT(depth=2)
    cfg = config.load("w8a8")  # made for depth 24
    with pytest.raises(ConfigError) as error:
        config.resolve(cfg, model)
    message = str(error.value)
    assert "joint_blocks.1.context_block.mlp.fc1" in message  # the last block's text stream is pre-only
    assert "joint_blocks.2.x_block.attn.qkv" in message and "joint_blocks.23.context_block" not in message
    assert "more" in message  # long lists are cut, with a count
    bad = config.BitConfig(weight={"joint_blocks.0.x_block.attn.qkv": 8, "down_blocks.0.attn1.to_q": 8,
                                   "joint_blocks.0.x_block.norm1": 8})
    with pytest.raises(ConfigError) as error:
        config.resolve(bad, model)
    assert "down_blocks.0.attn1.to_q" in str(error.value) and "joint_blocks.0.x_block.norm1" in str(error.value)
    assert "2 layer(s)" in str(error.value)


@pytest.mark.parametrize("data, words", [
    ({"weight": {"a": 2}}, ["weight bits 2", "a"]),
    ({"weight": {"a": 8}, "act": {"a": 4}}, ["activation bits 4"]),
    ({"weight": {}, "act": {"a": 8}}, ["weight stays float"]),
    ({"weight": {"a": 8}, "act": {"a": 8}, "act_mode": "static"}, ["no act_scales entry for a"]),
    ({"weight": {"a": 8}, "act_mode": "fast"}, ["act_mode 'fast'"]),
    ({"weights": {"a": 8}}, ["'weight:' section"]),
    ({"weight": {"a": 8}, "extra": 1}, ["unknown keys ['extra']"]),
    ({"weight": [1, 2]}, ["must be a mapping"]),
])
def test_bad_configs_say_what_is_wrong(data, words):
    with pytest.raises(ConfigError) as error:
        config.from_dict(data)
    for word in words:
        assert word in str(error.value)


def test_int4_on_a_layer_that_does_not_split_into_groups():
    model = TinyMMDiT(depth=2, dim=48)
    with pytest.raises(ConfigError, match="divisible by group_size 64"):
        config.resolve(config.BitConfig(weight={"joint_blocks.0.x_block.attn.qkv": 4}), model)


def test_yaml_roundtrip_and_missing_file(tmp_path):
    cfg = config.BitConfig(weight={"x": 4, "y": 8}, act={"y": 8}, act_protect=("y",), act_mode="static",
                           act_scales={"y": 0.5}, name="mine")
    path = tmp_path / "mine.yaml"
    config.save(cfg, path)
    assert config.load(path) == cfg
    assert cfg.int8_act_layers() == []  # protected
    path.write_text("weight: {x: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")


def test_mixdq_style_flat_maps_load(tmp_path):
    """MixDQ's weight/act YAMLs are flat ``layer: bits`` maps: they paste in as the two sections."""
    weight = {"joint_blocks.0.x_block.mlp.fc1": 4, "joint_blocks.0.x_block.attn.qkv": 8}
    act = {"joint_blocks.0.x_block.attn.qkv": 8}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"weight": weight, "act": act, "act_protect": []}), encoding="utf-8")
    cfg = config.load(path)
    plan = config.resolve(cfg, TinyMMDiT(depth=2))
    assert plan["joint_blocks.0.x_block.mlp.fc1"].w_bits == 4 and plan["joint_blocks.0.x_block.mlp.fc1"].act_mode == "float"
    assert plan["joint_blocks.0.x_block.attn.qkv"].act_mode == "dynamic"
