"""One guard for model calls whose output may be non-finite: recompute at higher precision, else a named error.

Used around the SD3 denoiser (the SD3Denoiser patch in :mod:`lib_sd3.webui.samplers`) and around T5-XXL
(:mod:`lib_sd3.webui.t5`). Both overflow the same way: fp16 tops out at 65504, an activation beyond
it becomes inf and then NaN. bf16 has fp32's exponent range at fp16's cost, so the first rung of
the ladder recomputes under bf16 autocast; the last one turns autocast off and runs fp32 inputs.
Nothing is reloaded: only the one call is repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_sd3 import get_logger

log = get_logger("nan_guard")


class NonFiniteError(RuntimeError):
    """A model output stayed NaN/inf after recomputing at higher precision."""


def _always(_device: torch.device) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Precision:
    """One rung of the guard's ladder: a context to recompute in, and the dtype for float inputs.

    ``name`` is what errors and the denoiser's infotext say (``bf16 autocast``); ``short`` is the
    compute precision alone (``bf16``), as T5's infotext writes it (``fp16 (recomputed in bf16)``).
    ``available`` says whether the rung can run on a device at all; one that cannot is skipped.
    """

    name: str
    short: str
    context: Callable[[torch.device], contextlib.AbstractContextManager]
    input_dtype: torch.dtype | None = None
    available: Callable[[torch.device], bool] = _always


def bf16_supported(device: torch.device) -> bool:
    """False on a CUDA GPU without bf16 (before Ampere), where entering bf16 autocast raises."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


# cache_enabled=False on both rungs: inside an outer fp16 autocast (A1111 samples and encodes in one),
# autocast's weight-cast cache is keyed by the weight alone, so with the cache on it would hand the bf16 recompute
# the fp16 casts of the outer pass (a dtype mismatch, or the same overflow again).
BF16_AUTOCAST = Precision("bf16 autocast", "bf16",
                          lambda device: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False),
                          available=bf16_supported)
"""bf16 has fp32's exponent range, so the fp16 overflows that become NaN do not happen."""

FP32 = Precision("fp32", "fp32", lambda device: torch.autocast(device.type, enabled=False, cache_enabled=False),
                 torch.float32)
"""Autocast off and float inputs in fp32: full precision wherever the weights are fp32."""

DEFAULT_LADDER = (BF16_AUTOCAST, FP32)


@dataclasses.dataclass(frozen=True)
class Recovery:
    """A model call whose non-finite output was replaced by a finite recompute."""

    what: str
    where: str
    precision: Precision


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []


def all_finite(out: Any) -> bool:
    """One isfinite reduction per floating tensor in ``out`` (one for a plain denoiser output)."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(out) if t.is_floating_point())


def first_finite(out: Any) -> bool:
    """For text encoders returning ``(hidden_state, pooled, ...)``: only the hidden state must be finite.
    A1111's T5 returns ``(z, None)``; what else a wrapped encoder returns is not what is concatenated into
    the conditioning, so it must not trigger a recompute."""
    return all_finite(out[0] if isinstance(out, (tuple, list)) else out)


def _cast(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _promote(recovered: Any, original: Any) -> Any:
    """Return the recompute in a dtype at least as wide as both, so a fp16 caller cannot overflow it again."""
    if isinstance(recovered, torch.Tensor) and isinstance(original, torch.Tensor) and recovered.is_floating_point():
        return recovered.to(torch.promote_types(recovered.dtype, original.dtype))  # bf16 + fp16 -> fp32
    if isinstance(recovered, (tuple, list)) and isinstance(original, (tuple, list)):
        return type(recovered)(_promote(r, o) for r, o in zip(recovered, original, strict=True))
    if isinstance(recovered, dict) and isinstance(original, dict):
        return {k: _promote(v, original.get(k)) for k, v in recovered.items()}
    return recovered


class NanGuard:
    """Call a model; if its output is non-finite, recompute it up a precision ladder, else raise.

    Cost without NaNs: one ``isfinite(...).all()`` per call. ``recoveries`` records each rescue for the
    infotext. ``hint`` ends the error with what the user can try; ``finite`` decides which part of the
    output must be finite (every floating tensor by default; :func:`first_finite` for text encoders)::

        guard = NanGuard(hint="Try --no-half.", finite=first_finite)
        hidden, pooled = guard(t5, tokens, what="T5", where="prompt 1")

    Tensors, tuples, lists and dicts of tensors are all handled; the recompute comes back in a dtype
    at least as wide as the original (bf16 next to fp16 becomes fp32, so it cannot overflow again).
    """

    def __init__(self, hint: str, ladder: Sequence[Precision] = DEFAULT_LADDER,
                 finite: Callable[[Any], bool] = all_finite) -> None:
        self.hint = hint
        self.ladder = tuple(ladder)
        self.finite = finite
        self.recoveries: list[Recovery] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, what: str = "model",
                 where: str | Callable[[], str] = "", **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if self.finite(out):
            return out
        # Autocast where the model computed: its output's device first (T5 takes token ids on the CPU
        # or as lists, and returns its output on its own device), else its inputs'.
        tensors = _tensors(out) + _tensors(args) + _tensors(kwargs)
        device = tensors[0].device if tensors else torch.device("cpu")
        tried = []
        for precision in self.ladder:
            if not precision.available(device):
                tried.append(f"{precision.name} (not supported on {device.type})")
                continue
            try:
                with precision.context(device):
                    again = fn(*_cast(args, precision.input_dtype), **_cast(kwargs, precision.input_dtype))
            except Exception as error:  # e.g. an op without a kernel in this dtype: try the next rung
                tried.append(f"{precision.name} (failed: {error})")
                continue
            if self.finite(again):
                recovery = Recovery(what, where() if callable(where) else where, precision)
                self.recoveries.append(recovery)
                log.warning("%s output was not finite%s; recomputed in %s", what,
                            f" at {recovery.where}" if recovery.where else "", precision.name)
                return _promote(again, out)
            tried.append(f"{precision.name} (still non-finite)")
        place = where() if callable(where) else where
        raise NonFiniteError(f"{what} produced NaN/inf values{' at ' + place if place else ''}; recomputed with "
                             f"{', '.join(tried) or 'nothing'}. {self.hint}")

    def summary(self) -> str:
        """Infotext form, e.g. ``2 recovered (bf16 autocast)``; empty when nothing was recovered."""
        if not self.recoveries:
            return ""
        names = sorted({r.precision.name for r in self.recoveries})
        return f"{len(self.recoveries)} recovered ({', '.join(names)})"
