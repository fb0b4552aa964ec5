"""DDIM, DDIM CFG++ and LCM in flow form (alpha = 1 - s, sigma = s)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lib_sd3.sampling.loop import noise_or_seeded, progress


def ddim_noise_std(s: float, s_next: float, eta: float) -> float:
    """Song et al.'s DDIM noise std for general (alpha, sigma): eta s' sqrt(1 - (s' alpha / (s alpha'))^2)."""
    if eta == 0 or s_next == 0:
        return 0.0
    ratio = (s_next * (1 - s)) / (s * (1 - s_next))
    return eta * s_next * math.sqrt(max(0.0, 1 - ratio * ratio))


def ddim_step(x: torch.Tensor, s: float, s_next: float, denoised: torch.Tensor, eps_denoised: torch.Tensor,
              eta: float, noise: Callable[[float, float], torch.Tensor]) -> torch.Tensor:
    """x' = (1 - s') D + sqrt(s'^2 - c^2) eps + c z, eps = (x - (1 - s) D_eps) / s.

    With eta = 0 this is the Euler step x' = (s'/s) x + (1 - s'/s) D. ``eps_denoised`` differs from
    ``denoised`` only for CFG++, which renoises with the unconditional prediction.
    """
    if s_next == 0:
        return denoised
    c = ddim_noise_std(s, s_next, eta)
    keep = math.sqrt(s_next * s_next - c * c) / s  # weight of x in the eps direction
    x_next = keep * x + (1 - s_next) * denoised - keep * (1 - s) * eps_denoised
    return x_next + c * noise(s, s_next) if c > 0 else x_next


@torch.no_grad()
def sample_flow_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0,
                     noise_sampler=None):
    """DDIM on flow levels; eta = 0 is Euler, eta > 0 adds fresh noise at the flow signal scale."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = noise_or_seeded(x, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in progress(len(sigmas) - 1, disable):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = ddim_step(x, s, s_next, denoised, denoised, eta, lambda a, b: s_noise * noise_sampler(a, b))
    return x


@torch.no_grad()
def sample_flow_ddim_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0,
                           noise_sampler=None):
    """CFG++ (Chung et al. 2024) in flow form: denoise with the guided D, renoise with the unguided one.

    The model follows A1111's CFG denoiser protocol: after each call ``model.last_noise_uncond`` holds
    the unconditional output, which for SD3's denoiser is the unconditional x0 (set
    ``model.need_last_noise_uncond = True`` before sampling, as A1111's own DDIM CFG++ does).
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = noise_or_seeded(x, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in progress(len(sigmas) - 1, disable):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = getattr(model, "last_noise_uncond", None)
        if uncond is None:
            raise TypeError("DDIM CFG++ needs a CFG denoiser that stores last_noise_uncond (the unconditional x0)")
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = ddim_step(x, s, s_next, denoised, uncond, eta, lambda a, b: s_noise * noise_sampler(a, b))
    return x


@torch.no_grad()
def sample_flow_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """LCM's multistep sampling (Luo et al. 2023) on flow levels: denoise, then re-noise to the next level.

    A consistency model's output is a sample of the data, so (1 - s') D + s' z with fresh z is exactly
    distributed as the flow marginal at s'. A1111's LCM re-noises with D + s' z, the VE form, which on
    a flow model leaves the signal at the wrong scale (and its denoiser class only knows SD1.5's eps model).
    """
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = noise_or_seeded(x, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in progress(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        s_next = float(sigmas[i + 1])
        x = (1 - s_next) * denoised + s_next * noise_sampler(sigmas[i], sigmas[i + 1]) if s_next > 0 else denoised
    return x

