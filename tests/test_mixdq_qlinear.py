"""The quantized Linear against fp64 references computed here from first principles."""

import pytest
import torch

from lib_sd3.mixdq import kernels, quantizers
from lib_sd3.mixdq.qlinear import QuantLinear, layer_bytes


def fp64_fake_quant_rows(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest per row, in fp64: the maths QuantLinear must reproduce."""
    t = t.double()
    qmax = 2 ** (bits - 1) - 1
    scale = t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.round(t / scale).clamp(-qmax, qmax) * scale


def fp64_weight(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    if bits == 8:
        return fp64_fake_quant_rows(weight, 8)
    n, k = weight.shape
    return fp64_fake_quant_rows(weight.reshape(n * k // group, group), 4).reshape(n, k)


def make_linear(k=128, n=96, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, n)[:, None].to(dtype))  # uneven rows: per-channel scales matter
    return lin


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("act_mode", ["dynamic", "static", "float"])
def test_matches_fp64_reference(w_bits, act_mode):
    lin = make_linear()
    x = torch.randn(3, 40, 128)
    static_scale = float(x.abs().amax()) / 127
    q = QuantLinear.from_linear(lin, w_bits, act_mode, group_size=32,
                                act_scale=static_scale if act_mode == "static" else None)
    w_ref = fp64_weight(lin.weight.detach(), w_bits, 32)
    x2 = x.reshape(-1, 128).double()
    if act_mode == "dynamic":
        x_ref = fp64_fake_quant_rows(x2, 8)
    elif act_mode == "static":
        x_ref = torch.round(x2 / static_scale).clamp(-127, 127) * static_scale
    else:
        x_ref = x2
    expected = (x_ref @ w_ref.T + lin.bias.detach().double()).reshape(3, 40, 96)
    got = q(x).double()
    tol = 1e-4 * expected.abs().max()
    if w_bits == 4:
        # group scales are stored as fp16 ratios (relative rounding 2^-11 of each weight) ...
        tol = tol + 2.0**-11 * (x_ref.abs() @ w_ref.abs().T).max()
        if act_mode != "float":  # ... and the int8 GEMM sees them on a per-row int8 grid: <= |w|max / 254 each
            tol = tol + (x_ref.abs().sum(dim=1).max() * lin.weight.abs().amax().double() / 254)
    assert (got - expected).abs().max() <= tol
    # and the quantization error itself is what the bit width promises (vs the unquantized fp64 product)
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < {8: 0.02, 4: 0.12}[w_bits]


def test_int8_codes_round_half_to_even_and_clip():
    """The magic-number rounding equals round-then-clamp computed in fp64, ties and both ends included."""
    x = torch.cat((torch.arange(-130.0, 131.0, 0.5), torch.randn(1000) * 60)).reshape(-1, 2)
    inv = torch.ones(x.shape[0], 1)
    expected = torch.round(x.double()).clamp(-127, 127)
    assert torch.equal(quantizers.int8_codes(x, inv, clip=True).double(), expected)
    inside = x.abs().amax(dim=1) <= 127
    assert torch.equal(quantizers.int8_codes(x[inside], inv[inside], clip=False).double(), expected[inside])
    scaled = quantizers.int8_codes(x, torch.tensor(0.25), clip=True).double()  # a 0-d static scale
    assert torch.equal(scaled, torch.round(x.double() * 0.25).clamp(-127, 127))


def test_int4_pack_roundtrip_and_sign():
    q = torch.randint(-7, 8, (5, 64), dtype=torch.int8)  # (N, K): packed along K
    packed = quantizers.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert int(packed[3, 7]) == (int(q[3, 14]) & 0xF) | ((int(q[3, 15]) & 0xF) << 4)
    assert torch.equal(quantizers.unpack_int4(packed), q)


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_bytes_is_what_is_allocated(w_bits, bias):
    lin = torch.nn.Linear(128, 48, bias=bias).half()
    for mode in ("dynamic", "static"):
        q = QuantLinear.from_linear(lin, w_bits, mode, act_scale=0.1)
        assert q.storage_bytes() == layer_bytes(48, 128, w_bits, bias, torch.float16, static_act=mode == "static")
    assert layer_bytes(48, 128, 16, bias, torch.float16) == sum(p.numel() * 2 for p in lin.parameters())


def test_memory_ratios_of_the_formats():
    full = layer_bytes(1536, 1536, 16, True, torch.float16)
    assert layer_bytes(1536, 1536, 8, True, torch.float16) / full < 0.51
    assert layer_bytes(1536, 1536, 4, True, torch.float16) / full < 0.28


def test_int_mm_plan_rules():
    assert kernels.plan_int_mm(4096, 1536, 1536, "cuda") == "int_mm"
    assert kernels.plan_int_mm(2, 1536, 9216, "cuda") == "pad_rows"  # adaLN: M = batch
    assert kernels.plan_int_mm(16, 1536, 1536, "cuda") == "pad_rows"
    assert kernels.plan_int_mm(17, 1536, 1536, "cuda") == "int_mm"
    assert kernels.plan_int_mm(4096, 1540, 1536, "cuda") == "fallback"
    assert kernels.plan_int_mm(4096, 1536, 1532, "cuda") == "fallback"
    assert kernels.plan_int_mm(2, 1530, 7, "cpu") == "int_mm"
    assert kernels.plan_int_mm(4096, 1536, 1536, "mps") == "fallback"
    assert kernels.plan_int_mm(4096, 1536, 1536, "cpu", available=False) == "fallback"


def test_padded_rows_give_the_same_product():
    a = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)  # (N, K), as QuantLinear stores it
    exact = a.long() @ w.long().T
    assert torch.equal(kernels.int8_matmul(a, w, "int_mm").long(), exact)
    assert torch.equal(kernels.int8_matmul(a, w, "pad_rows").long(), exact)
    with pytest.raises(ValueError):
        kernels.int8_matmul(a, w, "fallback")


def test_small_batch_and_fallback_paths_agree(monkeypatch):
    lin = make_linear()
    q = QuantLinear.from_linear(lin, 8, "float")
    x = torch.randn(2, 128)  # adaLN-like: one row per image
    reference = x.double() @ q.dequantized_weight(torch.float64).T + lin.bias.double()
    assert torch.allclose(q(x).double(), reference, atol=1e-4)
    dynamic = QuantLinear.from_linear(lin, 8, "dynamic")
    monkeypatch.setattr(kernels, "plan_int_mm", lambda *a, **k: "fallback")
    assert torch.allclose(dynamic(x).double(), reference, atol=1e-4)  # fallback = dequantize then matmul


def test_bos_row_is_kept_out_of_activation_quantization():
    lin = make_linear()
    x = torch.randn(2, 20, 128)
    x[:, 0] *= 500.0  # CLIP BOS: a huge outlier token
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    static = float(x[:, 1:].abs().amax()) / 127  # calibrated without the BOS row
    aware = QuantLinear.from_linear(lin, 8, "static", act_scale=static, float_rows=1)(x).double()
    naive = QuantLinear.from_linear(lin, 8, "static", act_scale=float(x.abs().amax()) / 127)(x).double()

    def err(y):
        return ((y[:, 1:] - exact[:, 1:]).norm() / exact[:, 1:].norm()).item()

    assert err(aware) < 0.02 < err(naive)
    w_only = x[:, :1].double() @ fp64_weight(lin.weight.detach(), 8, 0).T + lin.bias.double()
    assert torch.allclose(aware[:, :1], w_only, rtol=1e-4, atol=1e-2)


def test_half_precision_input_keeps_dtype():
    lin = make_linear(dtype=torch.bfloat16)
    q = QuantLinear.from_linear(lin, 8, "dynamic")
    x = torch.randn(1, 33, 128, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert kernels.int_mm_available("cpu")  # it ran the int8 path, not the session-wide fallback
    assert torch.nn.functional.cosine_similarity(y.double().flatten(), lin(x).double().flatten(), dim=0) > 0.999


def test_bad_arguments_are_clear():
    lin = make_linear(k=100)
    with pytest.raises(ValueError, match="divisible by the group size"):
        QuantLinear.from_linear(lin, 4, group_size=64)
    with pytest.raises(ValueError, match="weight bits"):
        QuantLinear.from_linear(lin, 2)
    with pytest.raises(ValueError, match="act_scale"):
        QuantLinear.from_linear(lin, 8, "static")


@pytest.mark.parametrize("grad", [False, True])
def test_no_bias_and_autograd_inputs(grad):
    """The in-place CPU rescale must not change results, with or without autograd in play."""
    lin = torch.nn.Linear(64, 40, bias=False)
    q = QuantLinear.from_linear(lin, 8, "dynamic")
    x = torch.randn(30, 64, requires_grad=grad)
    expected = fp64_fake_quant_rows(x.detach(), 8) @ fp64_weight(lin.weight.detach(), 8, 0).T
    with torch.set_grad_enabled(grad):
        got = q(x if grad else x.detach())
    assert torch.allclose(got.double(), expected, atol=1e-4)


def test_int8_gemm_failure_falls_back_for_the_session(monkeypatch):
    lin = make_linear()
    q = QuantLinear.from_linear(lin, 8, "dynamic")
    x = torch.randn(40, 128)
    expected = x.double() @ q.dequantized_weight(torch.float64).T + lin.bias.double()

    def broken(*args, **kwargs):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(kernels, "int8_matmul", broken)
    monkeypatch.setattr(kernels, "_FAILED", set())
    assert torch.allclose(q(x).double(), expected, atol=1e-4)
    assert not kernels.int_mm_available("cpu")


@pytest.mark.parametrize("act_mode", ["dynamic", "static"])
def test_cpu_row_blocks_give_the_same_result(monkeypatch, act_mode):
    """Quantization and rescale in several CPU row blocks (a ragged last one) equal the one-block result."""
    lin = make_linear(k=64, n=40)
    x = torch.randn(30, 64)
    q = QuantLinear.from_linear(lin, 8, act_mode, act_scale=float(x.abs().amax()) / 100)  # static clips some
    whole = q(x)
    monkeypatch.setattr(quantizers, "CPU_CHUNK_BYTES", 4 * 64 * 7)  # 7 rows of fp32 per block
    assert len(quantizers.row_blocks(30, 64, x.device)) == 5
    assert torch.equal(q(x), whole)
