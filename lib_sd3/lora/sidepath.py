"""A float LoRA path beside a layer whose weight cannot take a merged delta (MixDQ's int8 / int4 layers).

``y = layer(x) + sum_i s_i * up_i (down_i x)`` for low-rank terms, ``+ x D_i^T`` for dense ones. This is
exactly the LoRA delta in float; only the base weight stays quantized. It is attached from outside with
a forward hook, so the quantized layer's code is not touched, and costs two thin matmuls per LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

HOOK_ATTR = "_sd3_lora_side_path"


@dataclasses.dataclass
class Term:
    """One LoRA's contribution: ``scale * up @ down`` (``down`` None: ``up`` is the dense delta)."""

    up: torch.Tensor
    down: torch.Tensor | None
    scale: float

    def to(self, device: torch.device, dtype: torch.dtype) -> Term:
        down = None if self.down is None else self.down.to(device=device, dtype=dtype)
        return Term(self.up.to(device=device, dtype=dtype), down, self.scale)

    def add_into(self, out2d: torch.Tensor, x2d: torch.Tensor) -> None:
        """``out2d += scale * x2d (up down)^T`` with the second matmul, the scale and the add in one ``addmm_``."""
        hidden = x2d if self.down is None else x2d @ self.down.t()
        out2d.addmm_(hidden, self.up.t(), alpha=self.scale)


KeyFn = Callable[[nn.Module], object]
"""(layer) -> a cheap key that changes whenever the set of active LoRAs or their strengths change."""
TermsFn = Callable[[nn.Module], Sequence[Term]]
"""(layer) -> its LoRA terms (only called when the key changed)."""


class SidePath:
    """The hook state of one layer: terms cached on the layer's device/dtype until the key changes."""

    def __init__(self, key_fn: KeyFn, terms_fn: TermsFn) -> None:
        self.key_fn, self.terms_fn = key_fn, terms_fn
        self._key: object = None
        self._terms: list[Term] = []
        self._where: tuple[torch.device, torch.dtype] | None = None

    def terms(self, module: nn.Module, x: torch.Tensor) -> list[Term]:
        key = self.key_fn(module)
        if key != self._key or self._where != (x.device, x.dtype):
            self._terms = [t.to(x.device, x.dtype) for t in self.terms_fn(module)]
            self._key, self._where = key, (x.device, x.dtype)
        return self._terms

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        terms = self.terms(module, args[0])
        if not terms:
            return output
        x = args[0]
        out = output if output.is_contiguous() else output.contiguous()
        out2d, x2d = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        for term in terms:
            term.add_into(out2d, x2d)
        return out


def attach(module: nn.Module, key_fn: KeyFn, terms_fn: TermsFn) -> SidePath:
    """Give ``module`` a side path (once; a second call returns the existing one)."""
    existing = getattr(module, HOOK_ATTR, None)
    if existing is not None:
        return existing[0]
    path = SidePath(key_fn, terms_fn)
    handle = module.register_forward_hook(path)
    setattr(module, HOOK_ATTR, (path, handle))
    return path


def detach(module: nn.Module) -> None:
    existing = getattr(module, HOOK_ATTR, None)
    if existing is not None:
        existing[1].remove()
        delattr(module, HOOK_ATTR)
