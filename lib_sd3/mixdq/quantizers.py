"""Quantization maths: symmetric integer grids for weights and activations.

Everything is symmetric (zero point 0) because SD3's Linear weights and the activations entering
them are close to zero-centred, and a zero point would add a correction term to every integer
GEMM. Grids are ``q in [-(2^(b-1) - 1), 2^(b-1) - 1]`` (the most negative code is left unused so
that ``-q`` is always representable and the grid is exactly symmetric):

    scale = amax / qmax,  q = clamp(round(x / scale), -qmax, qmax),  x_hat = q * scale.

Weights: int8 per output channel (one scale per row of W), or int4 in groups of ``group_size``
input channels per output channel (a scale per group), two codes packed per byte. Both are kept
as ``W`` is, ``(N, K)`` row-major: ``W.t()`` is then the column-major ``(K, N)`` operand that
cuBLASLt's int8 GEMM runs fastest (docs/mixdq.md). Activations:
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
"""fp32 bytes handled per step by the CPU activation quantization and rescale: within a last-level
cache, so the second pass over a block hits cache, and no full-size fp32 temporary is allocated
(a fresh 100 MB buffer is mmap'ed and page-faulted on every call: at K = 6144 that alone cost more
than the GEMM). Not smaller: every block is a few OpenMP-parallel ops, and on a busy machine each
op can wait a scheduler slice for a descheduled thread (docs/mixdq.md)."""

ROUND_MAGIC = 1.5 * 2**23
"""fp32 value whose neighbours are exactly 1 apart: ``v + ROUND_MAGIC`` for ``|v| < 2^22`` rounds ``v``
to the nearest integer (ties to even, like ``torch.round``) and leaves it in the low mantissa bits."""


def row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    """Row slices of about :data:`CPU_CHUNK_BYTES` of fp32 on the CPU; one slice elsewhere (a GPU's
    caching allocator reuses full-size buffers, and each extra kernel launch costs more than it saves)."""
    if device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, CPU_CHUNK_BYTES // (4 * max(cols, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def int8_codes(x: torch.Tensor, inv_scale: torch.Tensor, clip: bool, out: torch.Tensor | None = None,
               work: torch.Tensor | None = None) -> torch.Tensor:
    """``round(x * inv_scale)`` as int8 in two passes over X instead of four (multiply, round, clamp, cast).

    One fp32 fused multiply-add ``x * inv_scale + ROUND_MAGIC`` does the scaling and the rounding
    (read from X's own dtype, no float copy of it); the sum's int32 bit pattern is
    ``0x4B400000 + round(v)``, whose low byte is ``round(v)`` in two's complement for
    ``|v| <= 127``, and narrowing int32 -> int8 keeps exactly that byte. ``clip`` clamps to
    ``[-127, 127]`` first (static scales; a dynamic per-row scale cannot be exceeded).
    ``work`` (fp32, X's shape) and ``out`` (int8) are optional preallocated buffers.
    """
    magic = torch.full((), ROUND_MAGIC, dtype=torch.float32, device=x.device)
    t = torch.addcmul(magic, x, inv_scale, out=work)
    if clip:
        t.clamp_(ROUND_MAGIC - INT8_QMAX, ROUND_MAGIC + INT8_QMAX)
    if out is None:
        return t.view(torch.int32).to(torch.int8)
    return out.copy_(t.view(torch.int32))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8: ``X (M, K)`` -> codes ``(M, K)`` and fp32 scales ``(M, 1)``, one per token (row).

    Block by block (:func:`row_blocks`): ``|x|`` into an fp32 work block, its row maxima, then the
    codes through the same block -- two reads of X, the rest in cache. No clamp is needed: with
    ``scale = amax / 127`` every ``|x / scale| <= 127`` (to rounding). Integer codes carry no
    gradient; quantized layers are for inference.
    """
    x = x.detach()
    blocks = row_blocks(x.shape[0], x.shape[1], x.device)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    work = torch.empty(blocks[0].stop - blocks[0].start if blocks else 0, x.shape[1], dtype=torch.float32,
                       device=x.device)
    for block in blocks:
        xb, wb = x[block], work[: block.stop - block.start]
        magnitude = torch.abs(xb, out=wb) if xb.dtype == wb.dtype else xb.abs()  # abs(out=) keeps the dtype
        scale[block] = symmetric_scale(magnitude.amax(dim=1, keepdim=True), 8)
        int8_codes(xb, 1.0 / scale[block], clip=False, out=q[block], work=wb)
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static int8 with a calibrated scale (a 0-d fp32 tensor); values beyond it are clipped."""
    x = x.detach()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    blocks = row_blocks(x.shape[0], x.shape[1], x.device)
    work = torch.empty(blocks[0].stop - blocks[0].start if blocks else 0, x.shape[1], dtype=torch.float32,
                       device=x.device)
    inv = 1.0 / scale
    for block in blocks:
        int8_codes(x[block], inv, clip=True, out=q[block], work=work[: block.stop - block.start])
    return q
