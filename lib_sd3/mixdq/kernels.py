"""Integer GEMM: ``torch._int_mm`` where it runs, with its shape rules made explicit.

``torch._int_mm(a, b)`` multiplies int8 ``a (M, K)`` by int8 ``b (K, N)`` into int32. On CUDA
(cuBLASLt) it insists on ``M > 16`` and ``K``, ``N`` multiples of 8. Weights are stored like
``nn.Linear``'s, ``(N, K)`` contiguous, and passed as ``w.t()``: a column-major ``b`` is cuBLASLt's
native int8 layout ("TN"), measured 5.5x faster on an H200 than a row-major ``(K, N)`` at SD3's
shapes with identical results; oneDNN on the CPU takes it as fast or faster. SD3's adaLN and embedder Linears run with ``M`` = batch size (1-4 rows):
their rows are zero-padded up to :data:`CUDA_MIN_ROWS` (zero rows give zero outputs, dropped
after). The CPU kernel (PyTorch >= 2.3, oneDNN/VNNI) has no shape rules. Anything else (MPS, a
PyTorch without ``_int_mm``) takes the caller's dequantize-then-matmul fallback.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

CUDA_MIN_ROWS = 32
"""Rows a CUDA int8 GEMM is padded to: the kernel needs more than 16, and 32 keeps M a multiple of 8."""

CUDA_ALIGN = 8  # K and N must be multiples of this on CUDA

Plan = Literal["int_mm", "pad_rows", "fallback"]


def plan_int_mm(m: int, k: int, n: int, device_type: str, available: bool = True) -> Plan:
    """How to run an ``(M, K) x (K, N)`` int8 product on ``device_type``; pure, so it is tested on CPU."""
    if not available:
        return "fallback"
    if device_type == "cpu":
        return "int_mm"
    if device_type == "cuda":
        if k % CUDA_ALIGN or n % CUDA_ALIGN:
            return "fallback"
        return "int_mm" if m > 16 else "pad_rows"
    return "fallback"


_FAILED: set[str] = set()  # device types whose int8 GEMM raised at run time (e.g. a GPU without int8 tensor cores)


def mark_failed(device_type: str) -> None:
    """Stop using the int8 GEMM on ``device_type`` for this session (callers then dequantize)."""
    _FAILED.add(device_type)


def int_mm_available(device_type: str) -> bool:
    return device_type not in _FAILED and _int_mm_supported(device_type)


@functools.cache
def _int_mm_supported(device_type: str) -> bool:
    """Whether this PyTorch has an int8 GEMM on ``device_type`` (feature-tested once, not version-sniffed)."""
    if not hasattr(torch, "_int_mm"):
        return False
    if device_type == "cpu":
        try:
            torch._int_mm(torch.ones(17, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
        except RuntimeError:  # PyTorch 2.1/2.2: CUDA-only kernel
            return False
        return True
    return device_type == "cuda"


def pad_rows(a: torch.Tensor, rows: int) -> torch.Tensor:
    """``a`` with zero rows appended up to ``rows`` (no copy when it already has that many)."""
    if a.shape[0] >= rows:
        return a
    return torch.cat((a, a.new_zeros(rows - a.shape[0], a.shape[1])))


def int8_matmul(a: torch.Tensor, w: torch.Tensor, plan: Plan) -> torch.Tensor:
    """int8 ``a (M, K) @ w.t()`` for an int8 ``w (N, K)`` -> int32 ``(M, N)``, following ``plan`` (not "fallback")."""
    a, b = a.contiguous(), w.contiguous().t()
    if plan == "pad_rows":
        m = a.shape[0]
        return torch._int_mm(pad_rows(a, CUDA_MIN_ROWS), b)[:m]
    if plan == "int_mm":
        return torch._int_mm(a, b)
    raise ValueError(f"int8_matmul cannot run plan {plan!r}; the caller must dequantize instead")
