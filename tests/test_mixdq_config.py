"""Bit configs: loading, validation, clear errors, the shipped files and the diffusers name map."""

import pytest
import torch
import yaml
from a1111.mmdit import TinyMMDiT
from torch import nn

from lib_sd3.mixdq import config, layers, shipped
from lib_sd3.mixdq.config import ConfigError


def tiny_diffusers(depth=2, **extra):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=depth, attention_head_dim=32,
                                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                                 pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8, **extra)


def named_linears(names) -> nn.Module:
    """A module tree with one small Linear (K = 64, one int4 group) at each dotted name."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, nn.Linear(64, 8))
    return root


FAMILIES = {"sd3-medium": shipped.sd3_medium_linears(), "sd3.5-large": shipped.sd35_large_linears(),
            "sd3.5-medium": shipped.sd35_medium_linears()}


def test_shipped_files_are_the_pattern_rules():
    for kind in config.SHIPPED:
        assert config.load(kind) == shipped.patterns(kind)
    assert config.load("fp8").weight_format == "fp8"


@pytest.mark.parametrize("family", FAMILIES)
def test_one_pattern_config_fits_every_family(family):
    """The shipped pattern file gives, layer for layer, the explicit rule: attn2 like attn, embedders float."""
    names = FAMILIES[family]
    model = named_linears(names)
    for kind in config.SHIPPED:
        assert config.resolve(config.load(kind), model) == config.resolve(shipped.preset(kind, names), model)
    plan = config.resolve(config.load("w4a8"), model)
    assert "context_embedder" not in plan and "final_layer.linear" not in plan
    assert plan["joint_blocks.0.x_block.attn.qkv"].w_bits == 8 and plan["joint_blocks.0.x_block.mlp.fc1"].w_bits == 4
    if family == "sd3.5-medium":
        assert plan["joint_blocks.12.x_block.attn2.qkv"] == plan["joint_blocks.12.x_block.attn.qkv"]
        assert plan["joint_blocks.12.x_block.attn2.proj"].act_mode == "dynamic"
    depth = 38 if family == "sd3.5-large" else 24
    assert f"joint_blocks.{depth - 1}.x_block.mlp.fc2" in plan


def test_shipped_configs_fit_a_depth_24_model_in_both_namings():
    a1111 = TinyMMDiT(depth=24, dim=64)
    diffusers = tiny_diffusers(depth=24)
    medium = shipped.sd3_medium_linears()
    assert {n for n, _ in layers.linear_layers(a1111)} == set(medium)
    for kind in config.SHIPPED:
        cfg = config.load(kind)
        plan_a = config.resolve(cfg, a1111)
        plan_d = config.resolve(cfg, diffusers)
        assert set(plan_a) == set(shipped.preset(kind, medium).weight)
        # diffusers splits each fused qkv into three Linears
        qkv = sum(1 for n in plan_a if n.endswith("attn.qkv"))
        assert len(plan_d) == len(plan_a) + 2 * qkv
        assert {layers.canonical_name(n) for n in plan_d} == set(plan_a)
        for name, plan in plan_d.items():
            assert plan == plan_a[layers.canonical_name(name)]


def test_sd35_qk_norm_and_mmdit_x_in_diffusers_naming():
    """SD3.5-shaped diffusers transformer (qk-norm, dual attention in block 0): attn2 maps onto
    ``x_block.attn2`` and is quantized like attn; the RMSNorm qk-norm weights are no Linear and stay float."""
    from lib_sd3.mixdq import model as mixdq_model

    m = tiny_diffusers(depth=2, qk_norm="rms_norm", dual_attention_layers=(0,))
    assert layers.canonical_name("transformer_blocks.0.attn2.to_k") == "joint_blocks.0.x_block.attn2.qkv"
    assert layers.canonical_name("transformer_blocks.0.attn2.to_out.0") == "joint_blocks.0.x_block.attn2.proj"
    plan = config.resolve(config.load("w8a8"), m)
    assert plan["transformer_blocks.0.attn2.to_q"] == plan["transformer_blocks.0.attn.to_q"]
    assert plan["transformer_blocks.0.attn2.to_out.0"].act_mode == "dynamic"
    norms = {n: p.detach().clone() for n, p in m.named_parameters() if ".norm_q." in n or ".norm_k." in n
             or "norm_added_" in n}
    assert norms
    mixdq_model.quantize(m, config.load("w8a8"))
    after = dict(m.named_parameters())
    for name, value in norms.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value)
    mixdq_model.restore(m)


def test_text_stream_layers_are_bos_aware():
    plan = config.resolve(config.load("w8a8"), tiny_diffusers(depth=24))
    assert plan["transformer_blocks.3.attn.add_k_proj"].float_rows == 1
    assert plan["transformer_blocks.3.ff_context.net.2"].float_rows == 1
    assert plan["transformer_blocks.3.attn.to_k"].float_rows == 0
    assert plan["transformer_blocks.3.norm1.linear"].act_mode == "float"  # adaLN: one row per image
    assert plan["transformer_blocks.3.ff.net.0.proj"].act_mode == "dynamic"


def test_names_the_model_lacks_are_listed():
    model = TinyMMDiT(depth=2)
    cfg = shipped.preset("w8a8", shipped.sd3_medium_linears())  # an explicit list made for depth 24
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


def test_patterns_a_plain_name_wins_and_a_config_that_matches_nothing_fails():
    model = TinyMMDiT(depth=2)
    cfg = config.BitConfig(weight={"joint_blocks.*.x_block.mlp.fc1": 4, "joint_blocks.1.x_block.mlp.fc1": 8,
                                   "joint_blocks.*.x_block.attn2.qkv": 8})  # attn2: none here, fine
    plan = config.resolve(cfg, model)
    assert plan["joint_blocks.0.x_block.mlp.fc1"].w_bits == 4 and plan["joint_blocks.1.x_block.mlp.fc1"].w_bits == 8
    assert len(plan) == 2
    with pytest.raises(ConfigError, match="matches no Linear layer"):
        config.resolve(config.BitConfig(weight={"down_blocks.*.attn1.to_q": 8}), model)


@pytest.mark.parametrize("data, words", [
    ({"weight": {"a": 2}}, ["weight bits 2", "a"]),
    ({"weight": {"a": 8}, "act": {"a": 4}}, ["activation bits 4"]),
    ({"weight": {}, "act": {"a": 8}}, ["weight stays float"]),
    ({"weight": {"a": 8}, "act": {"a": 8}, "act_mode": "static"}, ["no act_scales entry for a"]),
    ({"weight": {"a": 8}, "act_mode": "fast"}, ["act_mode 'fast'"]),
    ({"weights": {"a": 8}}, ["'weight:' section"]),
    ({"weight": {"a": 8}, "extra": 1}, ["unknown keys ['extra']"]),
    ({"weight": [1, 2]}, ["must be a mapping"]),
    ({"weight": {"a": 4}, "weight_format": "fp8"}, ["fp8 is 8 bits"]),
    ({"weight": {"a": 8}, "weight_format": "fp16"}, ["weight_format 'fp16'"]),
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
