"""Kernel paths (compiled, eager, fp8, weight-only) against the float layer, and the choice between them."""

import logging

import pytest
import torch
from a1111.mmdit import TinyMMDiT

from lib_sd3.mixdq import config, kernels, model, selection
from lib_sd3.mixdq.qlinear import QuantLinear

W8A8_COSINE = 0.995  # the bar for every W8A8 path against the float layer


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def float_and_input(k=128, n=64, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin, torch.randn(m, k, generator=g)


@pytest.fixture
def fresh_failures(monkeypatch):
    monkeypatch.setattr(kernels, "_FAILED_PATHS", set())
    monkeypatch.setattr(kernels, "_FAILED", set())


@pytest.mark.parametrize("path, w_bits, fmt, bar", [
    ("eager", 8, "int", W8A8_COSINE), ("weight_only", 8, "int", 0.9999), ("weight_only", 4, "int", 0.99),
    ("fp8", 8, "fp8", W8A8_COSINE), ("weight_only", 8, "fp8", 0.999),
])
def test_each_path_matches_the_float_layer(path, w_bits, fmt, bar, fresh_failures):
    lin, x = float_and_input()
    q = QuantLinear.from_linear(lin, w_bits, "dynamic", weight_format=fmt)
    expected = lin(x).detach()
    got = q.run(x, path)
    assert got.dtype == x.dtype and got.shape == expected.shape
    assert cosine(got, expected) >= bar


def test_compiled_path_equals_the_eager_maths(fresh_failures):
    """One small torch.compile (C++ on CPU): the fused W8A8 layer against the float layer and the eager one."""
    if kernels.missing("compiled", "cpu"):
        pytest.skip(kernels.missing("compiled", "cpu"))
    lin, x = float_and_input()
    q = QuantLinear.from_linear(lin, 8, "dynamic")
    fused = q.run(x, "compiled")
    assert not kernels.path_failed("compiled", "cpu"), "torch.compile failed here"
    assert cosine(fused, lin(x).detach()) >= W8A8_COSINE
    # the same integer maths: equal to the eager path up to fp32 rounding of the scales
    assert torch.allclose(fused, q.run(x, "eager"), atol=1e-4 * float(fused.abs().max()))
    if kernels.missing("fp8_compiled", "cpu") is None:
        f8 = QuantLinear.from_linear(lin, 8, "dynamic", weight_format="fp8")
        fused8 = f8.run(x, "fp8_compiled")
        assert not kernels.path_failed("fp8_compiled", "cpu"), "torch.compile of the fp8 layer failed here"
        assert torch.allclose(fused8, f8.run(x, "fp8"), atol=1e-4 * float(fused8.abs().max()))


def test_fp8_scaled_mm_equals_the_emulated_reference():
    """``torch._scaled_mm`` (on CPU here; the FP8 tensor cores on a GPU) against the fp32 emulation of the same codes."""
    lin, x = float_and_input(k=64, n=48, m=32)
    q = QuantLinear.from_linear(lin, 8, "dynamic", weight_format="fp8")
    reference = kernels.fp8_reference(x, q.qweight, q.wscale, q.bias)
    assert cosine(reference, lin(x).detach()) >= W8A8_COSINE
    if kernels.missing("fp8", "cpu"):
        pytest.skip(kernels.missing("fp8", "cpu"))
    assert torch.allclose(kernels.fp8_matmul(x, q.qweight, q.wscale, q.bias), reference, rtol=1e-5, atol=1e-5)


def test_a_failing_kernel_falls_back_once_with_one_log_line(monkeypatch, caplog, fresh_failures):
    lin, x = float_and_input()
    q = QuantLinear.from_linear(lin, 8, "dynamic")
    q.kernel = "compiled"

    def broken(*args):
        raise RuntimeError("InductorError: no working C++ compiler")

    monkeypatch.setattr(kernels, "COMPILED", broken)
    with caplog.at_level(logging.WARNING):
        first, second = q(x), q(x)
    assert torch.equal(first, second) and cosine(first, lin(x).detach()) > 0.9999  # the weight-only product
    assert kernels.path_failed("compiled", "cpu")
    assert sum("kernel compiled failed" in r.getMessage() for r in caplog.records) == 1


def test_selection_times_the_paths_and_reports_why(monkeypatch, fresh_failures):
    """A layer of 1024 x 1024 is timed; a path whose output is wrong is rejected by the fidelity check."""
    lin, _ = float_and_input(k=1024, n=1024)
    q = QuantLinear.from_linear(lin, 8, "dynamic")
    monkeypatch.setattr(selection, "TIMING_ROWS", 64)
    monkeypatch.setattr(kernels, "_compile_missing", lambda device: "no C++ compiler (stubbed for speed)")
    choice = selection.Selector().choose([q], "int")
    assert set(choice.timings_ms) == {"eager", "weight_only"}
    assert choice.path == min(choice.timings_ms, key=choice.timings_ms.get)
    assert "compiled" in choice.rejected and "compiler" in choice.why
    assert choice.report()["kernel_what"] == kernels.PATHS[choice.path].what

    monkeypatch.setitem(QuantLinear._RUNNERS, "eager", lambda layer, x: torch.zeros(x.shape[0], layer.out_features))
    broken = selection.Selector().choose([q], "int")
    assert broken.path == "weight_only" and "fidelity" in broken.rejected["eager"]
    assert selection.Selector().choose([q], "int", forced="eager").path == "eager"
    with pytest.raises(ValueError, match="does not serve"):
        selection.Selector().choose([q], "int", forced="fp8")


def test_fp8_config_quantizes_caches_and_restores(tmp_path, fresh_failures):
    torch.manual_seed(0)
    m = TinyMMDiT(depth=2)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 1000, torch.randn(2, 32, generator=g),
         torch.randn(2, 10, 48, generator=g))
    reference = m(*x).detach()
    first = model.quantize(m, config.load("fp8"), cache_dir=tmp_path)
    assert m.joint_blocks[0].x_block.mlp.fc1.qweight.dtype == torch.float8_e4m3fn
    assert first.report()["kernel"] in ("fp8", "weight_only")
    out = m(*x).detach()
    model.restore(m)
    second = model.quantize(m, config.load("fp8"), cache_dir=tmp_path)
    assert second.cache_hit and torch.equal(m(*x), out)
    assert cosine(out, reference) > 0.999
    model.restore(m)
    assert len(list(tmp_path.glob("mixdq-*.safetensors"))) == 1
    model.quantize(m, config.load("w8a8"), cache_dir=tmp_path)  # another digest: its own file
    model.restore(m)
    assert len(list(tmp_path.glob("mixdq-*.safetensors"))) == 2
