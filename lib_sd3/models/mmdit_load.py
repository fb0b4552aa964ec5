"""Build the MMDiT a checkpoint's family needs -- and refuse to fill it partly.

A1111 loads with ``load_state_dict(strict=False)`` (and, on its fast path, fills whatever the file
lacks with zeros), so a checkpoint that does not match the model it builds is never an error:
it is a garbage image. Here every ``model.diffusion_model.*`` key of the file must have a
parameter of the same shape, and every parameter a key; otherwise :class:`KeyMismatchError`
names the family and the first offending keys, before anything is written into a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lib_sd3.models.families import FIRST_ERRORS, CheckpointError, Family, MMDiTConfig
from lib_sd3.models.mmdit import MMDiT, QkvLinear


class KeyMismatchError(CheckpointError):
    """The checkpoint's MMDiT keys and the model's parameters do not match one to one."""


def build_mmdit(config: MMDiTConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                qkv_linear: type[nn.Linear] = QkvLinear) -> MMDiT:
    return MMDiT(config, qkv_linear=qkv_linear, dtype=dtype, device=device)


def expected_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the MMDiT a config builds, from a model on the meta device (no memory)."""
    return {key: tuple(t.shape) for key, t in build_mmdit(config, device="meta").state_dict().items()}


def mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
             ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) keys, each sorted."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    return missing, unexpected, wrong


def check_complete(family: Family, expected: Mapping[str, tuple[int, ...]],
                   checkpoint: Mapping[str, tuple[int, ...]], where: str = "checkpoint") -> None:
    """Raise :class:`KeyMismatchError` unless the checkpoint's MMDiT keys fill ``expected`` exactly.

    ``expected`` holds unprefixed MMDiT keys; ``checkpoint`` the file's keys (only those under the
    family's prefix count).
    """
    prefix = family.prefix
    found = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    missing, unexpected, wrong = mismatch(expected, found)
    if not (missing or unexpected or wrong):
        return
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {what} (first: {', '.join(prefix + k for k in keys[:FIRST_ERRORS])})")
    raise KeyMismatchError(f"{where}: {family.label} checkpoint does not fit its MMDiT: {'; '.join(parts)}")
