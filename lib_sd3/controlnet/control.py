"""ControlNet units in use: which are active at a step, and what they add to the base after each joint block.

Stability's rule (``mmditx.MMDiTX.forward_core_with_concat``): after joint block ``i`` the base adds the
ControlNet's hidden state ``i // (joint blocks // ControlNet blocks)`` (38 // 19 = 2 for SD3.5 Large) to the
image stream; a block skipped by skip-layer guidance is skipped with its addition. Each unit's hidden states
are scaled by its strength; several units add up. The control latent is one image, repeated to the batch
(CFG's cond and uncond halves both get it, as in the reference).

The SD3 Medium ControlNets in diffusers' layout (:mod:`.joint`) follow diffusers' ``SD3Transformer2DModel``, the
code they were trained with: hidden state ``int(i / (joint blocks / ControlNet blocks))`` (24 / 6 = 4 for
InstantX's), and nothing after the last joint block (its text stream is pre-only; ComfyUI does the same). A
block skipped by skip-layer guidance skips its addition here too (diffusers would still add it), as above.

A unit outside its start/end window, or with strength 0, does not run at all, and with no unit running the
base's forward is called exactly as without a ControlNet: the image is bit-identical to none.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lib_sd3.controlnet.joint import JointControlNet
from lib_sd3.controlnet.load import AnyControlNet
from lib_sd3.controlnet.model import ControlNet
from lib_sd3.sampling.slg import joint_blocks_of, skipped_layers


@dataclasses.dataclass
class ControlUnit:
    """One ControlNet with its control latent (``(1, C, H, W)``, from :mod:`lib_sd3.controlnet.preprocess`),
    strength and the window of the steps it acts in (fractions of the steps, both ends included)."""

    model: AnyControlNet
    latent: torch.Tensor
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def strength_at(self, step: int, steps: int) -> float:
        """The strength at ``step`` (0-based) of ``steps``: 0 outside ``start <= step / steps <= end``."""
        fraction = step / max(steps, 1)
        return self.strength if self.start <= fraction <= self.end else 0.0


def joint_residuals(hidden: Sequence[torch.Tensor], n_joint: int, skipped: Sequence[int] = ()
                    ) -> list[torch.Tensor | None]:
    """One unit's residual per joint block: ``hidden[i // (n_joint // len(hidden))]`` (the same tensor for the
    blocks sharing it), None where the block is skipped."""
    interval = n_joint // len(hidden)
    skip = set(skipped)
    return [None if i in skip else hidden[i // interval] for i in range(n_joint)]


def diffusers_joint_residuals(hidden: Sequence[torch.Tensor], n_joint: int, skipped: Sequence[int] = ()
                              ) -> list[torch.Tensor | None]:
    """diffusers' rule: ``hidden[int(i / (n_joint / len(hidden)))]`` (its float division, kept for the same
    index at every count), none after the last block, none where the block is skipped."""
    interval = n_joint / len(hidden)
    skip = {*skipped, n_joint - 1}
    return [None if i in skip else hidden[int(i / interval)] for i in range(n_joint)]


RESIDUAL_RULES = {ControlNet: joint_residuals, JointControlNet: diffusers_joint_residuals}
"""Which hidden state each joint block of the base gets, per kind of ControlNet."""


def add_residuals(total: list[torch.Tensor | None], more: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [b if a is None else a if b is None else a + b for a, b in zip(total, more, strict=True)]


@dataclasses.dataclass
class ControlStack:
    """The units of one generation (up to three in the UI; any number here)."""

    units: list[ControlUnit]

    def active(self, step: int, steps: int) -> list[tuple[ControlUnit, float]]:
        return [(unit, s) for unit in self.units if (s := unit.strength_at(step, steps)) != 0.0]

    def residuals(self, tokens: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor | None, n_joint: int,
                  active: Sequence[tuple[ControlUnit, float]], skipped: Sequence[int] = (),
                  x: torch.Tensor | None = None, context: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """The base's inputs as its forward has them (``tokens``: embedded ``x``; ``x``, ``context``: raw): each
        kind of ControlNet takes what it needs (:meth:`hidden_states`)."""
        total: list[torch.Tensor | None] = [None] * n_joint
        for unit, strength in active:
            model = unit.model
            latent = unit.latent.to(device=tokens.device, dtype=model.dtype)
            latent = latent.expand(tokens.shape[0], *latent.shape[1:]) if latent.shape[0] == 1 else latent
            inputs = {name: None if v is None else v.to(model.dtype)
                      for name, v in (("tokens", tokens), ("pooled", pooled), ("x", x), ("context", context))}
            hidden = model.hidden_states(latent, t=t, **inputs)
            hidden = [h.to(tokens.dtype).mul_(strength) for h in hidden]  # fresh outputs: scaled in place
            total = add_residuals(total, RESIDUAL_RULES[type(model)](hidden, n_joint, skipped))
        return total


@contextlib.contextmanager
def controlling(mmdit: nn.Module, stack: ControlStack | None, step: int, steps: int) -> Iterator[bool]:
    """Within the block, calls of ``mmdit`` (a :class:`lib_sd3.models.mmdit.MMDiT`) add the stack's residuals for
    ``step`` of ``steps``; yields whether any unit is active. With none active, nothing is touched.

    Like :func:`lib_sd3.sampling.slg.skip_blocks`, the instance's ``forward`` is shadowed and restored on exit, so any
    caller (A1111's ``BaseModel.apply_model`` included) runs it unchanged. Blocks that ``skip_blocks`` skips
    inside this block get no residual.
    """
    active = stack.active(step, steps) if stack is not None else []
    if not active:
        yield False
        return
    n_joint = len(joint_blocks_of(mmdit))
    own = mmdit.__dict__.get("forward")
    inner = own if own is not None else type(mmdit).forward.__get__(mmdit)

    def block_residuals(tokens: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor | None, x: torch.Tensor,
                        context: torch.Tensor | None):
        return stack.residuals(tokens, t, pooled, n_joint, active, skipped_layers(mmdit), x, context)

    def forward(*args, **kwargs):
        return inner(*args, block_residuals=block_residuals, **kwargs)

    mmdit.forward = forward
    try:
        yield True
    finally:
        if own is None:
            del mmdit.forward
        else:
            mmdit.forward = own
