"""Quantize in place and restore: bit-identical weights, memory back to baseline, disk cache."""

import pytest
import torch
from a1111.mmdit import TinyMMDiT

from lib_sd3.mixdq import config, layers, model, shipped
from lib_sd3.mixdq.qlinear import QuantLinear


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, 10, 48, generator=g)
    ctx[:, 0] *= 30  # BOS outlier
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, 32, generator=g), ctx)


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_ten_toggles_leave_weights_bit_identical_and_memory_at_baseline(tmp_path):
    torch.manual_seed(0)
    m = TinyMMDiT(depth=3)
    names = [n for n, _ in layers.linear_layers(m)]
    before = snapshot(m)
    params_before = {n: p for n, p in m.named_parameters()}
    qkv_class = type(m.joint_blocks[0].x_block.attn.qkv)
    baseline = model.module_bytes(m)
    x = inputs()
    reference = m(*x)
    for i in range(10):
        kind = ("w8a8", "w4a8")[i % 2]
        st = model.quantize(m, shipped.preset(kind, names), cache_dir=tmp_path / "cache", spill_dir=tmp_path)
        assert isinstance(m.joint_blocks[0].x_block.attn.qkv, QuantLinear)
        assert model.module_bytes(m) == st.bytes_after < 0.45 * baseline
        assert cosine(m(*x), reference) > (0.9999 if kind == "w8a8" else 0.999)
        assert st.cache_hit == (i >= 2)
        model.restore(m)
        assert model.module_bytes(m) == baseline
        assert model.state(m) is None
    after = snapshot(m)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p for n, p in m.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in m.named_parameters())  # the same Parameter objects come back
    assert type(m.joint_blocks[0].x_block.attn.qkv) is qkv_class
    assert torch.equal(m(*x), reference)
    assert not list(tmp_path.glob("mixdq-originals-*"))  # spill files are removed on restore


def test_originals_leave_ram_while_quantized_on_cpu(tmp_path):
    m = TinyMMDiT(depth=2)
    names = [n for n, _ in layers.linear_layers(m)]
    original = m.joint_blocks[0].x_block.mlp.fc1
    model.quantize(m, shipped.preset("w8a8", names), spill_dir=tmp_path)
    assert original.weight.numel() == 0  # spilled to disk, not held twice
    assert len(list(tmp_path.glob("mixdq-originals-*.safetensors"))) == 1
    model.restore(m)
    assert original.weight.shape == (256, 64)


def test_cache_gives_the_same_quantized_model(tmp_path):
    m = TinyMMDiT(depth=2)
    cfg = shipped.preset("w4a8", [n for n, _ in layers.linear_layers(m)])
    x = inputs()
    first = model.quantize(m, cfg, cache_dir=tmp_path, model_hash="abc")
    out_first = m(*x)
    model.restore(m)
    files = list(tmp_path.glob("mixdq-abc-*.safetensors"))
    assert len(files) == 1 and cfg.digest() in files[0].name
    second = model.quantize(m, cfg, cache_dir=tmp_path, model_hash="abc")
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(m(*x), out_first)
    model.restore(m)
    files[0].write_bytes(b"garbage")  # a broken cache file is rebuilt, not fatal
    third = model.quantize(m, cfg, cache_dir=tmp_path, model_hash="abc")
    assert not third.cache_hit and torch.equal(m(*x), out_first)
    model.restore(m)


def test_cache_of_another_layout_format_is_not_read(tmp_path, monkeypatch):
    """Files written under an older buffer layout (square layers would pass a shape check) are never read."""
    m = TinyMMDiT(depth=1)
    cfg = shipped.preset("w8a8", [n for n, _ in layers.linear_layers(m)])
    monkeypatch.setattr(model, "CACHE_FORMAT", "old")
    model.quantize(m, cfg, cache_dir=tmp_path, model_hash="abc")
    model.restore(m)
    monkeypatch.setattr(model, "CACHE_FORMAT", "new")
    assert not model.quantize(m, cfg, cache_dir=tmp_path, model_hash="abc").cache_hit
    model.restore(m)
    assert sorted(p.name.rsplit("-", 1)[1] for p in tmp_path.glob("mixdq-abc-*.safetensors")) == [
        "new.safetensors", "old.safetensors"]


def test_fingerprint_changes_with_the_weights():
    m = TinyMMDiT(depth=2)
    before = model.fingerprint(m)
    with torch.no_grad():
        m.joint_blocks[1].x_block.mlp.fc2.weight.mul_(1.01)
    assert model.fingerprint(m) != before


def test_bad_config_leaves_the_model_untouched():
    m = TinyMMDiT(depth=2)
    before = snapshot(m)
    with pytest.raises(config.ConfigError):  # an explicit list made for SD3 Medium's 24 blocks
        model.quantize(m, shipped.preset("w8a8", shipped.sd3_medium_linears()))
    assert model.state(m) is None and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_double_quantize_is_refused_and_restore_of_plain_model_is_noop():
    m = TinyMMDiT(depth=2)
    cfg = shipped.preset("w8a8", [n for n, _ in layers.linear_layers(m)])
    assert model.restore(m) is None
    model.quantize(m, cfg)
    with pytest.raises(RuntimeError, match="already"):
        model.quantize(m, cfg)
    model.restore(m)


def test_diffusers_transformer_quantizes_with_sd3_names():
    from test_mixdq_config import tiny_diffusers

    m = tiny_diffusers(depth=2)
    sd3_names = sorted({layers.canonical_name(n) for n, _ in layers.linear_layers(m)})
    cfg = shipped.preset("w8a8", sd3_names)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 12, 64, generator=g)
    ctx[:, 0] *= 30
    kwargs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=ctx, pooled_projections=torch.randn(1, 64, generator=g), return_dict=False)
    with torch.no_grad():
        ref = m(**kwargs)[0]
        before = snapshot(m)
        st = model.quantize(m, cfg)
        assert isinstance(m.transformer_blocks[0].attn.to_q, QuantLinear)
        assert m.transformer_blocks[0].attn.add_k_proj.float_rows == 1
        assert cosine(m(**kwargs)[0], ref) > 0.999
        model.restore(m)
    assert st.bytes_after < st.bytes_before
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_cache_covers_sd35_layers(tmp_path):
    """An SD3.5-Medium-shaped diffusers transformer (qk-norm, MMDiT-X attn2): the shipped pattern config, cached
    and loaded back, gives the same model; the qk-norm weights stay float parameters throughout."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                              num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                              pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
                              dual_attention_layers=(0,)).eval()
    g = torch.Generator().manual_seed(1)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 6, 64, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0]), return_dict=False)
    cfg = config.load("w4a8")
    first = model.quantize(m, cfg, cache_dir=tmp_path)
    assert isinstance(m.transformer_blocks[0].attn2.to_q, QuantLinear)
    with torch.no_grad():
        out = m(**args)[0]
    model.restore(m)
    second = model.quantize(m, cfg, cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit
    with torch.no_grad():
        assert torch.equal(m(**args)[0], out)
    assert isinstance(m.transformer_blocks[0].attn.norm_q.weight, torch.nn.Parameter)
    model.restore(m)
