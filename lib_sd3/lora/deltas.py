"""Dense deltas of LoRA / LoHa / LoKr / full-diff modules, and fusing several pieces into one module.

The formulas are the ones A1111's network modules (``network_lora`` / ``network_hada`` /
``network_lokr`` / ``network_full``) apply, so a delta computed here equals A1111's ``calc_updown``
before the user's strength: ``scale = alpha / rank`` when both exist, else 1 (or the stored ``scale``).

Precision: A1111 adds a module's delta as ``(weight.to(delta.dtype) + delta).to(weight.dtype)``, and its
LoHa / LoKr / full modules compute the delta in the dtype of the file's factors. A bf16 or fp16 LyCORIS
file would therefore round the delta *and the whole base weight* to 8 or 11 bits. Every dict handed on
here holds fp32 factors where that happens (:func:`upcast`); plain LoRA factors pass as they are, because
A1111 copies them into its own layers of the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lib_sd3.lora.names import Target

LORA_DOWN = "lora_down.weight"
LORA_UP = "lora_up.weight"
NOT_IN_FUSED = "not supported on a slice of a fused layer (tucker / DoRA / bias)"
SHAPE_MISMATCH = "shape does not fit this model"
UNKNOWN_KIND = "not a LoRA / LoHa / LoKr / diff module"


def kind(params: dict[str, torch.Tensor]) -> str | None:
    if LORA_UP in params and LORA_DOWN in params:
        return "lora"
    if all(k in params for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "loha"
    has_1 = "lokr_w1" in params or ("lokr_w1_a" in params and "lokr_w1_b" in params)
    has_2 = "lokr_w2" in params or ("lokr_w2_a" in params and "lokr_w2_b" in params)
    if has_1 and has_2:
        return "lokr"
    if "diff" in params:
        return "full"
    return None


def _rank(params: dict[str, torch.Tensor], what: str) -> int | None:
    if what == "lora":
        return params[LORA_DOWN].shape[0]
    if what == "loha":
        return params["hada_w1_b"].shape[0]
    if what == "lokr":
        for name in ("lokr_w2_b", "lokr_w1_b"):  # A1111 lets w2_b win when both are factorised
            if name in params:
                return params[name].shape[0]
    return None


def scale(params: dict[str, torch.Tensor]) -> float:
    """The factor A1111 multiplies a module's delta by (before the user's strength)."""
    if "scale" in params:
        return float(params["scale"])
    rank = _rank(params, kind(params) or "")
    if "alpha" in params and rank:
        return float(params["alpha"]) / rank
    return 1.0


def upcast(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's float tensors in fp32 unless it is a plain LoRA (see the module docstring)."""
    if _plain_lora(params):
        return dict(params)
    return {name: t.float() if t.is_floating_point() and t.element_size() < 4 else t for name, t in params.items()}


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).float()


def unscaled(params: dict[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The delta one module adds before its ``scale``, shaped ``shape``, in fp32 (one matmul for a LoRA)."""
    what = kind(params)
    if what == "lora":
        if "lora_mid.weight" in params:
            raise ValueError(NOT_IN_FUSED)
        delta = _mat(params[LORA_UP]) @ _mat(params[LORA_DOWN])
    elif what == "loha":
        if "hada_t1" in params or "hada_t2" in params:
            raise ValueError(NOT_IN_FUSED)
        delta = (_mat(params["hada_w1_a"]) @ _mat(params["hada_w1_b"])) * (
            _mat(params["hada_w2_a"]) @ _mat(params["hada_w2_b"]))
    elif what == "lokr":
        if "lokr_t2" in params:
            raise ValueError(NOT_IN_FUSED)
        w1 = params["lokr_w1"].float() if "lokr_w1" in params else _mat(params["lokr_w1_a"]) @ _mat(params["lokr_w1_b"])
        w2 = params["lokr_w2"].float() if "lokr_w2" in params else _mat(params["lokr_w2_a"]) @ _mat(params["lokr_w2_b"])
        delta = torch.kron(w1, w2.reshape(w2.shape[0], -1))
    elif what == "full":
        delta = params["diff"].float()
    else:
        raise ValueError(UNKNOWN_KIND)
    if delta.numel() != _numel(shape):
        raise ValueError(SHAPE_MISMATCH)
    return delta.reshape(shape)


def dense(params: dict[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The full delta ``(out, in[, kh, kw])`` one module adds at strength 1, in fp32."""
    return unscaled(params, shape) * scale(params)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def rows_of(target: Target, out_features: int) -> slice:
    if target.part is None:
        return slice(0, out_features)
    size = out_features // target.parts
    return slice(target.part * size, (target.part + 1) * size)


def swap_halves(rows: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale) along dim 0."""
    half = rows.shape[0] // 2
    return torch.cat((rows[half:], rows[:half]))


def _plain_lora(params: dict[str, torch.Tensor]) -> bool:
    return kind(params) == "lora" and not ({"lora_mid.weight", "dora_scale", "bias", "diff_b"} & set(params))


def _fuse_lora(pieces: Sequence[tuple[Target, dict[str, torch.Tensor]]], shape: Sequence[int]
               ) -> dict[str, torch.Tensor]:
    """Several LoRA pieces -> one exact LoRA: ``down`` stacked, ``up`` block-placed, each piece's scale folded in."""
    out = shape[0]
    downs, ups = [], []
    for target, params in pieces:
        up = _mat(params[LORA_UP]) * scale(params)
        if target.swap:
            up = swap_halves(up)
        placed = torch.zeros(out, up.shape[1], dtype=up.dtype)
        placed[rows_of(target, out)] = up
        ups.append(placed)
        downs.append(params[LORA_DOWN].float().reshape(up.shape[1], *params[LORA_DOWN].shape[1:]))
    return {LORA_UP: torch.cat(ups, dim=1), LORA_DOWN: torch.cat(downs, dim=0)}


def _check_lora_shapes(pieces: Sequence[tuple[Target, dict[str, torch.Tensor]]], shape: Sequence[int]) -> bool:
    for target, params in pieces:
        rows = rows_of(target, shape[0])
        up, down = params[LORA_UP], params[LORA_DOWN]
        if up.shape[0] != rows.stop - rows.start or up.shape[1] != down.shape[0]:
            return False
        if down[0].numel() != _numel(shape[1:]) and down.shape[1] != shape[1]:
            return False
    return True


def assemble(pieces: Sequence[tuple[Target, dict[str, torch.Tensor]]], shape: Sequence[int]
             ) -> tuple[dict[str, torch.Tensor] | None, str]:
    """One weights dict for a target module out of the pieces that land on it, or (None, why not).

    A single whole piece passes through unchanged but for :func:`upcast` (A1111 applies it as-is: DoRA,
    conv, tucker all keep working); LoRA pieces on slices become one block LoRA (exact, still low-rank,
    fp32); anything else on slices becomes a dense fp32 ``diff``.
    """
    if len(pieces) == 1 and pieces[0][0].part is None and not pieces[0][0].swap:
        params = pieces[0][1]
        if kind(params) is None:
            return None, UNKNOWN_KIND
        if kind(params) == "lora" and not _check_lora_shapes(pieces, shape):
            return None, SHAPE_MISMATCH
        return upcast(params), ""
    if all(_plain_lora(p) for _, p in pieces):
        if not _check_lora_shapes(pieces, shape):
            return None, SHAPE_MISMATCH
        return _fuse_lora(pieces, shape), ""
    total = torch.zeros(tuple(shape), dtype=torch.float32)
    for target, params in pieces:
        if "dora_scale" in params or "bias" in params or "diff_b" in params:
            return None, NOT_IN_FUSED
        rows = rows_of(target, shape[0])
        try:
            delta = dense(params, (rows.stop - rows.start, *shape[1:]))
        except ValueError as error:
            return None, str(error)
        total[rows] += swap_halves(delta) if target.swap else delta
    return {"diff": total}, ""


def merge(weights: dict[str, torch.Tensor], modules: dict[str, dict[str, torch.Tensor]], strength: float) -> None:
    """``W += strength * delta`` in place for every module (name -> its ``.weight`` in ``weights``)."""
    for name, params in modules.items():
        weight = weights[name]
        weight.add_(unscaled(params, weight.shape).to(weight.dtype), alpha=strength * scale(params))
