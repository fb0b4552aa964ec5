"""lib_sd3.lora key normaliser, deltas, detection and the quantized side path, on hand-made layouts."""

from __future__ import annotations

import pytest
import torch
from a1111.mmdit import TinyMMDiT

from lib_sd3.lora import deltas, detect, keys, names, sidepath

CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
T5_Q = "encoder.block.0.layer.0.SelfAttention.q"


@pytest.fixture(scope="module")
def layout():
    return {"unet": keys.layout_of(TinyMMDiT(depth=2, dim=16)), "te1": {CLIP_Q: (8, 8)}, "te2": {CLIP_Q: (12, 12)},
            "te3": {T5_Q: (6, 6)}}


def lora(prefix, out, inp, rank=2, alpha=None):
    sd = {f"{prefix}.lora_down.weight": torch.randn(rank, inp), f"{prefix}.lora_up.weight": torch.randn(out, rank)}
    if alpha is not None:
        sd[f"{prefix}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize(("prefix", "target"), [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", ("te1", CLIP_Q)),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ("te1", CLIP_Q)),
    ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", ("te2", CLIP_Q)),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", ("te2", CLIP_Q)),
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", ("te3", T5_Q)),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv", ("unet", "joint_blocks.0.x_block.attn.qkv")),
    ("diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1", ("unet", "joint_blocks.1.context_block.adaLN_modulation.1")),
    ("lora_transformer_context_embedder", ("unet", "context_embedder")),
    ("lycoris_time_text_embed_timestep_embedder_linear_2", ("unet", "t_embedder.mlp.2")),
    ("base_model.model.proj_out", ("unet", "final_layer.linear")),
])
def test_every_prefix_reaches_its_layer(layout, prefix, target):
    shape = layout[target[0]][target[1]]
    norm = keys.normalise(lora(prefix, shape[0], shape[1], alpha=1.0), layout)
    assert not norm.unmatched
    assert list(norm.modules) == [target]


def test_one_dot_keys_and_garbage_are_reported_not_raised(layout):
    sd = {"alpha": torch.tensor(1.0), "x.alpha": torch.tensor(1.0), "foo.bar.baz": torch.zeros(1),
          "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 2)}
    norm = keys.normalise(sd, layout)
    assert not norm.modules
    assert norm.unmatched == {"alpha": keys.UNKNOWN_PARAM, "x.alpha": keys.UNKNOWN_MODULE,
                              "foo.bar.baz": keys.UNKNOWN_PARAM, "lora_unet_no_such_layer.lora_down.weight": keys.UNKNOWN_MODULE}
    line = keys.unmatched_summary(norm.unmatched)
    assert "\n" not in line and line.startswith("4 keys not applied")


def test_wrong_width_is_a_shape_mismatch(layout):
    norm = keys.normalise(lora("transformer.context_embedder", 99, 48), layout)
    assert set(norm.unmatched.values()) == {deltas.SHAPE_MISMATCH}


def test_q_only_lands_in_the_q_rows_scaled(layout):
    sd = lora("transformer.transformer_blocks.0.attn.to_q", 16, 16, rank=2, alpha=4.0)
    norm = keys.normalise(sd, layout)
    w = norm.modules[("unet", "joint_blocks.0.x_block.attn.qkv")]
    delta = deltas.dense(w, (48, 16))
    expected = sd["transformer.transformer_blocks.0.attn.to_q.lora_up.weight"] @ sd[
        "transformer.transformer_blocks.0.attn.to_q.lora_down.weight"] * 2.0
    assert torch.allclose(delta[:16], expected, atol=1e-6)
    assert torch.count_nonzero(delta[16:]) == 0


def test_pre_only_text_norm_and_final_norm_swap_halves(layout):
    index = keys.KeyIndex(layout)
    last = index.resolve("transformer.transformer_blocks.1.norm1_context.linear")[1]
    first = index.resolve("transformer.transformer_blocks.0.norm1_context.linear")[1]
    final = index.resolve("transformer.norm_out.linear")[1]
    assert last.swap == names.ROW_SWAP_ALWAYS and final.swap == names.ROW_SWAP_ALWAYS and first.swap is None


def test_sd3_detection():
    assert detect.is_sd3_lora(["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], {})
    assert detect.is_sd3_lora(["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight"], {})
    assert not detect.is_sd3_lora(["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
                                   "transformer.single_transformer_blocks.0.proj_out.lora_A.weight"], {})  # Flux
    assert not detect.is_sd3_lora(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], {"ss_v2": "False"})
    assert detect.is_sd3_lora([], {"modelspec.architecture": "stable-diffusion-3-medium/lora"})


def test_side_path_on_a_w8a8_layer_is_the_exact_float_delta():
    from lib_sd3.mixdq.qlinear import QuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    layer = QuantLinear.from_linear(linear, 8, "dynamic")
    x = torch.randn(3, 5, 32)
    up, down = torch.randn(24, 4), torch.randn(4, 32)
    dense = torch.randn(24, 32)
    base = layer(x)
    active = [True]
    sidepath.attach(layer, lambda _m: active[0],
                    lambda _m: [sidepath.Term(up, down, 0.7), sidepath.Term(dense, None, 0.1)] if active[0] else [])
    expected = base + 0.7 * (x @ down.T @ up.T) + 0.1 * (x @ dense.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    active[0] = False
    assert torch.equal(layer(x), base)
    sidepath.detach(layer)
    assert not hasattr(layer, sidepath.HOOK_ATTR)
