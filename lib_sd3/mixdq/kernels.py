"""Integer GEMM: ``torch._int_mm`` where it runs, with its shape rules made explicit.

``torch._int_mm(a, b)`` multiplies int8 ``a (M, K)`` by int8 ``b (K, N)`` into int32. On CUDA
(cuBLASLt) it insists on ``M > 16`` and ``K``, ``N`` multiples of 8. Weights are stored like
``nn.Linear``'s, ``(N, K)`` contiguous, and passed as ``w.t()``: a column-major ``b`` is cuBLASLt's
native int8 layout ("TN"), much faster than a row-major ``(K, N)`` with identical results (figures:
docs/mixdq.md); oneDNN on the CPU takes it as fast or faster. SD3's adaLN and embedder Linears run
with ``M`` = batch size (1-4 rows): their rows are zero-padded up to :data:`CUDA_MIN_ROWS` (zero
rows give zero outputs, dropped after). The CPU kernel (PyTorch >= 2.3, oneDNN/VNNI) has no shape rules. Anything else (MPS, a
PyTorch without ``_int_mm``) takes the caller's dequantize-then-matmul fallback.

:data:`PATHS` is the one table of ways to run a quantized layer (compiled, eager, fp8,
weight-only); :mod:`~lib_sd3.mixdq.selection` times them on the model's own shapes and picks one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
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


# --- the kernel paths a quantized layer can run -------------------------------------------------

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later have FP8 tensor cores
FP8_CUDA_ROWS = 16  # M multiple for the CUDA FP8 GEMM


@dataclasses.dataclass(frozen=True)
class KernelPath:
    """One way to run a quantized Linear; :func:`missing` says why it cannot run on a device."""

    name: str
    formats: tuple[str, ...]  # weight formats it serves: "int" (int8 / int4 codes), "fp8"
    what: str


PATHS: dict[str, KernelPath] = {p.name: p for p in (
    KernelPath("compiled", ("int",), "torch.compile of the layer's maths: per-token quantization, int8 GEMM and "
                                     "rescale in fused kernels (Triton on CUDA, C++ on CPU)"),
    KernelPath("eager", ("int",), "eager PyTorch: per-token int8 quantization, torch._int_mm, rescale"),
    KernelPath("fp8_compiled", ("fp8",), "FP8 e4m3 W8A8 with the activation quantization fused by torch.compile"),
    KernelPath("fp8", ("fp8",), "FP8 e4m3 W8A8: torch._scaled_mm, per-row weight and per-token activation scales"),
    KernelPath("weight_only", ("int", "fp8"), "dequantize the weight, then the normal matmul (memory saved, "
                                              "no low-precision GEMM)"),
)}
"""Every path, in order of preference when timings tie. ``weight_only`` runs everywhere."""


def missing(path: str, device: torch.device | str) -> str | None:
    """Why ``path`` cannot run on ``device`` (None: it can). Feature tests, not version sniffing."""
    device_type = torch.device(device).type
    if (path, device_type) in _FAILED_PATHS:
        return "failed earlier this session"
    if path == "weight_only":
        return None
    if path in ("eager", "compiled") and not int_mm_available(device_type):
        return f"no int8 GEMM (torch._int_mm) on {device_type}"
    if path == "compiled":
        return _compile_missing(device_type)
    if path == "fp8":
        return _fp8_missing(torch.device(device))
    if path == "fp8_compiled":
        return _fp8_missing(torch.device(device)) or _compile_missing(device_type)
    return None


_FAILED_PATHS: set[tuple[str, str]] = set()


def mark_path_failed(path: str, device_type: str) -> None:
    _FAILED_PATHS.add((path, device_type))


def path_failed(path: str, device_type: str) -> bool:
    return (path, device_type) in _FAILED_PATHS


def _compile_missing(device_type: str) -> str | None:
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        return "no C++ compiler (g++ / c++ / clang++) for torch.compile on CPU"
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "no Triton for torch.compile on CUDA"
    if device_type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {device_type}"
    return None


def _fp8_missing(device: torch.device) -> str | None:
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return "this PyTorch has no float8 / torch._scaled_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        return f"GPU compute capability {torch.cuda.get_device_capability(device)} < 8.9: no FP8 tensor cores"
    if device.type not in ("cpu", "cuda"):
        return f"no FP8 GEMM on {device.type}"
    return None


def w8a8_dynamic(x2: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The whole W8A8 layer as plain tensor maths, so ``torch.compile`` can fuse it: per-token int8
    quantization of X, the int8 GEMM, and ``acc * s_x * s_w + b`` in the output dtype."""
    scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 127
    qx = torch.round(x2.float() / scale).to(torch.int8)
    y = torch._int_mm(qx, w.t()).float() * scale * wscale
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


class Compiled:
    """``torch.compile(fn)``, made on first use (dynamic shapes: one graph for all layers)."""

    def __init__(self, fn) -> None:
        self.source, self.fn = fn, None

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        if self.fn is None:
            self.fn = torch.compile(self.source, dynamic=True)
        return self.fn(*args)


def fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (N, K)`` -> e4m3 codes ``(N, K)`` and fp32 per-row scales ``(N,)`` (row amax -> 448)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token e4m3: ``X (M, K)`` -> codes and fp32 scales ``(M, 1)``."""
    scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x2.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul(x2: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """FP8 W8A8 through ``torch._scaled_mm`` (row-wise scales; the weight ``.t()`` is column-major, as it wants).

    On CUDA, cuBLASLt's row-wise scaled FP8 GEMM writes bf16 and wants M a multiple of 16 (zero
    rows are appended and dropped after); the CPU kernel writes fp32.
    """
    m = x2.shape[0]
    if x2.is_cuda and m % FP8_CUDA_ROWS:
        x2 = pad_rows(x2, -(-m // FP8_CUDA_ROWS) * FP8_CUDA_ROWS)
    qx, sx = fp8_activations(x2)
    out_dtype = torch.bfloat16 if x2.is_cuda else torch.float32
    y = torch._scaled_mm(qx, w.t(), scale_a=sx, scale_b=wscale.view(1, -1), out_dtype=out_dtype)[:m].float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def fp8_reference(x2: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same product emulated in fp32 (e4m3 codes decoded, then a float matmul): what
    :func:`fp8_matmul` must equal, used to check it on machines without FP8 tensor cores."""
    qx, sx = fp8_activations(x2)
    y = (qx.float() @ w.float().t()) * sx * wscale
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


COMPILED = Compiled(w8a8_dynamic)
COMPILED_FP8 = Compiled(fp8_matmul)
