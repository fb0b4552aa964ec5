"""lib_sd3.sampling.nan_guard: the one guard for the SD3 denoiser and T5 (recompute wider, else a named error).

Its use around the denoiser (sampler, step and sigma in the error) is tested in test_samplers.py and
test_webui_samplers.py; around A1111's T5 (infotext, status) in test_webui_t5.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lib_sd3.sampling import nan_guard as G

HINT = "Try the T5 setting off."


class Overflowing(torch.nn.Module):
    """Finite in fp32 and bf16; overflows to inf when its matmul runs in fp16 (like T5 on some prompts).

    Its weight requires grad (a leaf), so autocast caches its fp16 cast inside an outer fp16 autocast:
    a bf16 recompute that reused that cache would not run in bf16.
    """

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8, bias=False)
        torch.nn.init.constant_(self.linear.weight, 300.0)

    def forward(self, x):
        return self.linear(self.linear(x))


def test_non_finite_output_recomputed_in_bf16_inside_an_outer_fp16_autocast():
    model = Overflowing()
    x = torch.ones(1, 8)
    guard = G.NanGuard(hint=HINT)
    with torch.autocast("cpu", dtype=torch.float16):
        first = model(x)
        assert not torch.isfinite(first).all(), "the test needs an fp16 overflow"
        output = guard(model, x, what="T5")
    assert [(r.what, r.precision.name, r.precision.short) for r in guard.recoveries] == [("T5", "bf16 autocast", "bf16")]
    assert torch.isfinite(output).all() and output.dtype == torch.float32  # bf16 next to fp16: widened
    torch.testing.assert_close(output.float(), model(x), rtol=2e-2, atol=0)


def test_finite_output_is_not_recomputed_and_fp32_is_last_resort():
    calls = []

    def finite():
        calls.append(1)
        return torch.ones(2)

    guard = G.NanGuard(hint=HINT)
    assert torch.equal(guard(finite), torch.ones(2)) and len(calls) == 1 and guard.recoveries == []
    with pytest.raises(G.NonFiniteError, match=r"^T5 produced NaN/inf values; recomputed with bf16 autocast "
                                               r"\(still non-finite\), fp32 \(still non-finite\)\. Try the T5 setting off\.$"):
        guard(lambda: torch.tensor([float("nan")]), what="T5")
    answers = iter([torch.tensor([float("inf")]), torch.tensor([float("inf")]), torch.ones(1)])
    assert torch.equal(guard(lambda: next(answers)), torch.ones(1))
    assert [r.precision.short for r in guard.recoveries] == ["fp32"]
    assert guard.summary() == "1 recovered (fp32)"


def test_guard_checks_tuple_outputs_for_text_encoders():
    calls = []

    def encoder(tokens):
        calls.append(torch.is_autocast_enabled("cpu"))
        hidden = torch.ones(2, 3) if calls[-1] else torch.tensor([[float("inf"), 0, 0], [0, 0, 0]])
        return hidden, torch.zeros(2)

    guard = G.NanGuard(hint=HINT)
    hidden, pooled = guard(encoder, torch.tensor([1, 2]), what="T5", where="prompt 1")
    assert torch.isfinite(hidden).all() and calls == [False, True]
    assert (guard.recoveries[0].what, guard.recoveries[0].where) == ("T5", "prompt 1")


def test_first_finite_checks_only_the_hidden_state():
    calls = []

    def encoder(hidden_ok, rest_ok):
        calls.append(1)
        hidden = torch.ones(2) if hidden_ok else torch.tensor([0.0, float("inf")])
        return hidden, torch.ones(1) if rest_ok else torch.tensor([float("nan")])

    text_guard, full_guard = G.NanGuard(hint=HINT, finite=G.first_finite), G.NanGuard(hint=HINT)
    text_guard(encoder, True, False)
    assert len(calls) == 1 and text_guard.recoveries == [], "a non-finite extra output is not the hidden state"
    with pytest.raises(G.NonFiniteError):
        full_guard(encoder, True, False)
    assert len(calls) == 1 + 3, "the default guard checks every tensor: first pass + both rungs"
    with pytest.raises(G.NonFiniteError):
        text_guard(encoder, False, True)
    assert G.first_finite(torch.ones(3)) and not G.first_finite([torch.tensor([float("nan")]), torch.ones(1)])


def test_a_rung_the_device_cannot_run_is_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not G.BF16_AUTOCAST.available(torch.device("cuda"))  # e.g. a Pascal GPU: bf16 autocast would raise
    assert G.BF16_AUTOCAST.available(torch.device("cpu")) and G.FP32.available(torch.device("cuda"))

    entered = []
    unsupported = G.Precision("bf16 autocast", "bf16", lambda device: entered.append(device) or contextlib.nullcontext(),
                              available=lambda device: False)
    seen = []

    def model(x):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return x.float() if len(seen) > 1 else x * float("inf")

    guard = G.NanGuard(hint=HINT, ladder=(unsupported, G.FP32))
    out = guard(model, torch.ones(2, dtype=torch.bfloat16))
    assert entered == [] and seen == [(torch.bfloat16, False), (torch.float32, False)]  # fp32 rung casts inputs
    assert torch.equal(out, torch.ones(2)) and guard.recoveries[0].precision is G.FP32
    with pytest.raises(G.NonFiniteError, match=r"bf16 autocast \(not supported on cpu\), fp32 \(still non-finite\)"):
        guard(lambda x: x * float("nan"), torch.ones(2))


def test_a_rung_that_raises_is_reported_and_the_next_one_tried():
    def broken(device):
        raise RuntimeError("no kernel")

    guard = G.NanGuard(hint=HINT, ladder=(G.Precision("odd", "odd", broken), G.FP32))
    answers = iter([torch.tensor([float("nan")]), torch.ones(1)])
    assert torch.equal(guard(lambda: next(answers)), torch.ones(1))
    with pytest.raises(G.NonFiniteError, match=r"odd \(failed: no kernel\), fp32 \(still non-finite\)"):
        guard(lambda: torch.tensor([float("nan")]))
