"""Calibration end to end on tiny models: sensitivity, integer programme, budget kept exactly."""

import itertools

import pytest
import torch
from a1111.mmdit import TinyMMDiT

from lib_sd3.mixdq import calibrate as cal
from lib_sd3.mixdq import config, model


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny forwards: thread hand-offs cost more than the maths on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_samples(n=3):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ctx = torch.randn(1, 10, 48, generator=g)
        ctx[:, 0] *= 30
        s = 0.3 + 0.2 * i
        out.append({"x": torch.randn(1, 4, 8, 8, generator=g), "sigma": torch.tensor(s),
                    "timestep": torch.tensor([1000 * s]), "context": ctx, "pooled": torch.randn(1, 32, generator=g)})
    return out


def test_metrics():
    a = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    assert cal.ssim(a, a) == pytest.approx(1.0)
    assert cal.nsr(a, a) == 0.0
    assert cal.nsr(a, 1.1 * a) == pytest.approx(0.01)  # |0.1 a|^2 / |a|^2
    noisy = a + 0.3 * torch.randn_like(a)
    assert cal.ssim(a, noisy) < cal.ssim(a, a + 0.05 * torch.randn_like(a)) < 1.0
    assert cal.loss("content", a, noisy) == pytest.approx(1 - cal.ssim(a, noisy))


def brute_force(costs, sizes, budget):
    names = list(costs)
    best = None
    for choice in itertools.product(*[sorted(costs[n]) for n in names]):
        if sum(sizes[n][b] for n, b in zip(names, choice, strict=True)) <= budget:
            value = sum(costs[n][b] for n, b in zip(names, choice, strict=True))
            if best is None or value < best[0] - 1e-12:
                best = (value, dict(zip(names, choice, strict=True)))
    return best


def test_integer_programme_is_optimal_and_within_budget():
    g = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(6)]
    sizes = {n: {4: 10 + i, 8: 20 + 2 * i, 16: 40 + 4 * i} for i, n in enumerate(names)}
    for _ in range(5):
        raw = torch.rand(6, 2, generator=g).tolist()
        costs = {n: {4: max(r), 8: min(r), 16: 0.0} for n, r in zip(names, raw, strict=True)}
        for budget in (80, 120, 150, 200, 400):
            chosen = cal.allocate(costs, sizes, budget)
            total = sum(sizes[n][b] for n, b in chosen.items())
            assert total <= budget
            best_value, _ = brute_force(costs, sizes, budget)
            assert sum(costs[n][b] for n, b in chosen.items()) == pytest.approx(best_value, abs=1e-9)
    with pytest.raises(cal.BudgetError, match="smallest possible size"):
        cal.allocate(costs, sizes, 50)


def test_calibrate_end_to_end_respects_the_budget_exactly(tmp_path):
    torch.manual_seed(0)
    m = TinyMMDiT(depth=2, dim=64)
    samples = tiny_samples()
    forward = cal.denoised_forward(m)
    full = model.module_bytes(m)
    reference = [forward(m, s) for s in samples]
    budget = int(0.35 * full)
    cfg, report = cal.calibrate(m, samples, forward, budget, group_size=32, protect_fraction=0.2)
    assert report["predicted_bytes"] <= budget
    path = tmp_path / "calibrated.yaml"
    config.save(cfg, path)
    st = model.quantize(m, config.load(path))
    assert model.module_bytes(m) == report["predicted_bytes"] == st.bytes_after  # the prediction is the real size
    outs = [forward(m, s) for s in samples]
    model.restore(m)
    assert all(cal.nsr(r, o) < 0.5 for r, o in zip(reference, outs, strict=True))
    assert report["bits"][4] + report["bits"][8] > 0
    assert len(cfg.act_protect) == round(0.2 * len(cfg.act))
    # metric decoupling: both groups were measured with their own metric
    roles = {cal.layers.role(n) for n in report["sensitivity"]}
    assert roles == {"content", "quality"}


def test_more_sensitive_layers_get_more_bits():
    """Scale one layer's weights so int4 hurts it far more: the programme must protect it first."""
    torch.manual_seed(0)
    m = TinyMMDiT(depth=2, dim=64)
    with torch.no_grad():
        w = m.joint_blocks[0].x_block.mlp.fc2.weight
        w[:, ::7] *= 40  # outlier input channels: int4 groups lose everything else
    samples = tiny_samples(2)
    forward = cal.denoised_forward(m)
    units = cal.candidate_units(m)
    names = list(units)
    sens = cal.measure_sensitivity(m, samples, forward, units, group_size=32)
    target = "joint_blocks.0.x_block.mlp.fc2"
    peers = [n for n in names if cal.layers.role(n) == "quality" and n != target]
    assert sens.weight[target][4] > max(sens.weight[n][4] for n in peers)


def test_static_mode_writes_calibrated_scales():
    torch.manual_seed(0)
    m = TinyMMDiT(depth=2, dim=64)
    samples = tiny_samples(2)
    forward = cal.denoised_forward(m)
    # the BOS row is excluded: the context embedder's scale is set by the ordinary tokens
    scales = cal.static_act_scales(m, samples, forward, {n: [n] for n in ("context_embedder",
                                                                           "joint_blocks.0.x_block.attn.qkv")})
    ctx_amax = max(float(s["context"][:, 1:].abs().amax()) for s in samples)
    assert scales["context_embedder"] == pytest.approx(ctx_amax / 127)
    cfg, _ = cal.calibrate(m, samples[:1], forward, model.module_bytes(m) // 2, group_size=32, act_mode="static",
                           protect_fraction=0.0)
    assert cfg.act_mode == "static" and set(cfg.act_scales) == set(cfg.int8_act_layers()) != set()
    st = model.quantize(m, cfg)
    assert all(layer.act_scale > 0 for layer in m.modules() if getattr(layer, "act_mode", "") == "static")
    model.restore(m)
    assert st.bytes_after <= model.module_bytes(m)


def test_cli_tiny_run(tmp_path, capsys):
    from lib_sd3.mixdq.__main__ import main

    out = tmp_path / "tiny.yaml"
    assert main(["calibrate", "--tiny", "--budget-ratio", "0.4", "--max-prompts", "1", "--steps", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    import json

    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["predicted_bytes"] <= summary["budget_bytes"] == int(0.4 * summary["model_bytes"])
    written = config.load(out)
    assert written.weight
    # calibrated on diffusers' transformer, written in sd3-ref names: q/k/v are one unit
    assert all(not n.startswith("transformer_blocks") for n in written.weight)
    from lib_sd3.mixdq.__main__ import tiny_model

    plan = config.resolve(written, tiny_model())
    qkv = [n for n in written.weight if n.endswith("x_block.attn.qkv")]
    assert qkv
    for n in qkv:
        block = n.split(".")[1]
        bits = {plan[f"transformer_blocks.{block}.attn.to_{c}"].w_bits for c in "qkv"}
        assert bits == {written.weight[n]}
    assert len(cal.read_prompts()) >= 8
