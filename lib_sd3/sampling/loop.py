"""What every flow sampler loop shares: the progress bar, seeded fresh noise, the newest history items."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

NoiseSampler = Callable[[Any, Any], torch.Tensor]


def seeded_randn_like(x: torch.Tensor) -> torch.Tensor:
    """Noise from ``k_diffusion.sampling.torch``, which A1111 points at its per-image seeded generator, so a
    seed gives the same image at any batch size; plain torch where k-diffusion is not installed."""
    try:
        import k_diffusion.sampling
    except ImportError:
        return torch.randn_like(x)
    return k_diffusion.sampling.torch.randn_like(x).to(x)



def noise_or_seeded(x: torch.Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    """The caller's noise sampler, else :func:`seeded_randn_like` shaped like ``x``."""
    return noise_sampler if noise_sampler is not None else (lambda _s, _s_next: seeded_randn_like(x))


def newest(items: list, k: int) -> list:
    """The newest k items (none for k <= 0; plain slicing gets k = 0 wrong)."""
    return items[max(0, len(items) - k):] if k > 0 else []


def progress(n: int, disable: bool | None):
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is optional outside A1111
        return range(n)
    return trange(n, disable=disable)
