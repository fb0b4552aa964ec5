"""The NaN guard (lib_sd3.sampling.nan_guard) for the SD3 denoiser: its hint, and where a failure happened."""

from __future__ import annotations

import torch

from lib_sd3.sampling.nan_guard import NanGuard

DENOISER_HINT = ("Try: the --no-half command-line flag (or Settings > Stable Diffusion > upcast options), a lower "
                 "CFG scale, another sampler or schedule, or check the checkpoint file. Turning the SD3 NaN guard off "
                 "gives A1111's own NansException instead.")


def denoiser_guard() -> NanGuard:
    """A fresh guard for one generation's denoiser calls, whose error says what to try."""
    return NanGuard(hint=DENOISER_HINT)


def describe_step(sampler: str, sigmas: torch.Tensor, sigma: torch.Tensor | float) -> str:
    """``sampler DDIM, step 3/20, sigma 0.8421``: the step is the schedule entry nearest to sigma."""
    level = float(torch.as_tensor(sigma).flatten()[0])
    step = int(torch.argmin((sigmas.double() - level).abs()))
    return f"sampler {sampler}, step {step + 1}/{len(sigmas) - 1}, sigma {level:.4g}"


def describe_call(sampler: str, call: int, total: int | None, sigma: torch.Tensor | float) -> str:
    """``sampler DPM fast, step 3/8, sigma 0.4212`` for samplers without a schedule: the step is the model call
    (A1111's progress bar counts them too); DPM adaptive has no total."""
    level = float(torch.as_tensor(sigma).flatten()[0])
    return f"sampler {sampler}, step {call}{f'/{total}' if total else ''}, sigma {level:.4g}"

