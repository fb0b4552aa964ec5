"""Quantization maths: symmetric integer grids for weights and activations.

Everything is symmetric (zero point 0) because SD3's Linear weights and the activations entering
them are close to zero-centred, and a zero point would add a correction term to every integer
GEMM. Grids are ``q in [-(2^(b-1) - 1), 2^(b-1) - 1]`` (the most negative code is left unused so
that ``-q`` is always representable and the grid is exactly symmetric):

    scale = amax / qmax,  q = clamp(round(x / scale), -qmax, qmax),  x_hat = q * scale.

Weights: int8 per output channel (one scale per row of W), or int4 in groups of ``group_size``
input channels per output channel (a scale per group), two codes packed per byte. Both are kept
as ``W`` is, ``(N, K)`` row-major: ``W.t()`` is then the column-major ``(K, N)`` operand that
cuBLASLt's int8 GEMM runs fastest (5.5x faster than a row-major ``(K, N)`` on an H200). Activations:
int8 per token (dynamic, one scale per row of X, computed on the fly) or per tensor (static, one
scale from calibration).
"""

from __future__ import annotations

import torch

INT8_QMAX = 127
INT4_QMAX = 7
DEFAULT_GROUP_SIZE = 64
"""Input channels per int4 scale: 64 keeps the scale overhead at 16/64 = 0.25 bit per weight."""

_TINY = 1e-12  # floor for a scale so an all-zero row does not divide by zero


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def symmetric_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale mapping ``[-amax, amax]`` onto the symmetric ``bits``-bit grid (fp32)."""
    return amax.float().clamp_min(_TINY) / qmax(bits)


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (N, K)`` -> int8 codes ``(N, K)`` and fp32 per-output-channel scales ``(N,)``."""
    w = weight.detach().float()
    scale = symmetric_scale(w.abs().amax(dim=1), 8)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scale


def int4_group_layout(in_features: int, group_size: int) -> int:
    """Number of groups along K; K must split into whole groups and into whole bytes."""
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"int4 group size must be a positive even number, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size ({group_size})")
    return in_features // group_size


def quantize_weight_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (N, K)`` -> int4 codes as int8 ``(N, K)`` in [-7, 7] and fp32 group scales ``(N, K/G)``."""
    n, k = weight.shape
    groups = int4_group_layout(k, group_size)
    w = weight.detach().float().reshape(n, groups, group_size)
    scale = symmetric_scale(w.abs().amax(dim=2), 4)
    q = torch.round(w / scale[:, :, None]).clamp_(-INT4_QMAX, INT4_QMAX).to(torch.int8)
    return q.reshape(n, k), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit codes per byte along the last dim: column ``2j`` in the low nibble, ``2j+1`` in the high.

    Weights are packed as ``(N, K/2)`` so that unpacking yields the ``(N, K)`` weight directly,
    whose ``.t()`` is the column-major GEMM operand -- no transpose copy on any call.
    """
    if q.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even number of columns")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(N, K/2)`` -> int8 ``(N, K)`` with the sign restored."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both > 7, both - 16, both)


def int4_to_int8(packed: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Re-express int4 group codes on one int8 grid per output channel, for the int8 GEMM.

    With group scales ``s_g`` and a per-channel scale ``s_c = max_g |q4 s_g| / 127`` the weight is
    ``q4 s_g = (q4 r_g) s_c`` where ``r_g = s_g / s_c`` (stored, ``(N, K/G)``). Rounding ``q4 r_g``
    costs at most half an int8 step, 1/254 of the channel maximum -- far below the int4 error.
    Returns int8 ``(N, K)``.
    """
    q = unpack_int4(packed)
    n, k = q.shape
    groups = ratio.shape[1]
    q8 = torch.round(q.reshape(n, groups, k // groups).float() * ratio.float()[:, :, None])
    return q8.clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8).reshape(n, k)


def dequantize_int4(packed: torch.Tensor, group_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed int4 ``(N, K/2)`` + group scales ``(N, K/G)`` -> dense ``(N, K)`` weight in ``dtype``."""
    q = unpack_int4(packed)
    n, k = q.shape
    groups = group_scale.shape[1]
    w = q.reshape(n, groups, k // groups).float() * group_scale.float()[:, :, None]
    return w.reshape(n, k).to(dtype)


CPU_CHUNK_BYTES = 1 << 24
"""fp32 bytes handled per step by the CPU activation rounding and rescale: within a last-level
cache, so the second pass over a block hits cache, and no full-size fp32 temporary is allocated.
Not smaller: every block is a few OpenMP-parallel ops, and on a busy machine each op can wait
a scheduler slice for a descheduled thread (1 MiB blocks measured 2x slower there)."""


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8: ``X (M, K)`` -> codes ``(M, K)`` and fp32 scales ``(M, 1)``, one per token (row).

    No clamp is needed: with ``scale = amax / 127`` every ``|x / scale| <= 127`` (to rounding).
    Integer codes carry no gradient; quantized layers are for inference.
    """
    xf = x.detach().float()
    amax = torch.linalg.vector_norm(xf, ord=float("inf"), dim=1, keepdim=True)  # one pass, no |x| copy
    scale = symmetric_scale(amax, 8)
    inv = 1.0 / scale
    if xf.device.type != "cpu":
        return xf.mul(inv).round_().to(torch.int8), scale
    rows = max(1, CPU_CHUNK_BYTES // (4 * xf.shape[1]))
    q = torch.empty(xf.shape, dtype=torch.int8)
    work = torch.empty(min(rows, xf.shape[0]), xf.shape[1])
    for start in range(0, xf.shape[0], rows):
        stop = min(start + rows, xf.shape[0])
        chunk = work[: stop - start]
        torch.mul(xf[start:stop], inv[start:stop], out=chunk).round_()
        q[start:stop].copy_(chunk)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static int8 with a calibrated scale (a 0-d fp32 tensor); values beyond it are clipped."""
    return x.detach().float().mul(1.0 / scale).round_().clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
