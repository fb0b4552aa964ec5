"""Any k-diffusion sampler made exact on flow: run it in EDM coordinates, after an exact first step from pure noise.

x_edm = x / (1 - s), sigma_edm = s / (1 - s) turn the flow marginal into x_edm = x0 + sigma_edm e exactly, so an
unchanged VE sampler is exact there, noise included. s = 1 has no EDM sigma: the step from pure noise is the flow one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from lib_sd3.sampling.ddim import ddim_step
from lib_sd3.sampling.flow import edm_to_flow_sigma, flow_to_edm_sigma
from lib_sd3.sampling.loop import NoiseSampler, noise_or_seeded

EDM_CAP = 1e-4
"""s = 1 is sigma_edm = inf; EDM-space samplers start at s = 1 - EDM_CAP instead (sigma_edm ~ 1e4).
The start then differs from pure noise by O(1e-4) in the signal weight, far below what sampling sees."""


def edm_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for the EDM-space state: near s = 1 it is ~1e4 times the latent, and float32 steps there
    lose the digits the next step amplifies back (DPM2 a on a float32 latent: garbage). MPS has no float64."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def edm_denoiser(model, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The flow model seen in EDM coordinates: D_edm(x_edm, sigma) = D_flow(x_edm / (1 + sigma), sigma / (1 + sigma)),
    the flow model called in its own ``dtype``, the answer in the EDM state's."""

    def edm_model(x_edm, sigma, **model_kwargs):
        sigma_b = sigma.reshape(-1, *([1] * (x_edm.ndim - 1)))
        flow_x = (x_edm / (1 + sigma_b)).to(dtype)
        return model(flow_x, edm_to_flow_sigma(sigma).to(dtype), **model_kwargs).to(x_edm.dtype)

    return edm_model


def in_edm_space(sampler: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a VE/EDM k-diffusion sampler so that it samples a flow model exactly: only the change of variables.

    Inputs in flow space (x at level ``sigmas[0]``, flow ``sigmas`` / ``sigma_min`` / ``sigma_max``, a flow
    ``noise_sampler``) are converted to EDM space, the unchanged sampler runs there against
    D_edm(x_edm, sigma) = D_flow(x_edm / (1 + sigma), sigma / (1 + sigma)), and the result comes back as a
    flow latent. Levels above ``1 - EDM_CAP`` are capped there (s = 1 has no EDM sigma); start from pure noise
    with :func:`from_pure_noise` instead. The wrapper keeps the sampler's signature (A1111 inspects it).
    """

    @functools.wraps(sampler)
    def flow_sampler(model, x, *args, extra_args=None, callback=None, disable=None, **kwargs):
        if args:
            raise TypeError(f"{sampler.__name__} in EDM space takes sigmas and the rest by keyword")
        top = 1.0 - EDM_CAP
        flow_noise = kwargs.get("noise_sampler")
        if flow_noise is not None:  # e.g. A1111's Brownian tree, built over flow levels
            kwargs["noise_sampler"] = lambda s, s_next: flow_noise(edm_to_flow_sigma(s), edm_to_flow_sigma(s_next))
        dtype, work = x.dtype, edm_dtype(x)
        if "sigmas" in kwargs:
            levels = kwargs["sigmas"].clamp(max=top)
            kwargs["sigmas"] = flow_to_edm_sigma(levels).to(work)
            start, end = float(levels[0]), float(levels[-1])
        else:
            start, end = min(float(kwargs["sigma_max"]), top), float(kwargs["sigma_min"])
            kwargs["sigma_max"], kwargs["sigma_min"] = flow_to_edm_sigma(start), flow_to_edm_sigma(end)

        def edm_callback(info: dict) -> None:
            level = info.get("sigma_hat", info.get("sigma"))
            out = dict(info)
            if level is not None:
                out["x"] = info["x"] / (1 + level)
                out["sigma"] = edm_to_flow_sigma(info["sigma"])
                out["sigma_hat"] = edm_to_flow_sigma(level)
            callback(out)

        x_edm = x.to(work) / (1 - start)
        out = sampler(edm_denoiser(model, dtype), x_edm, extra_args=extra_args, callback=edm_callback if callback else None,
                      disable=disable, **kwargs)
        return (out / (1 + flow_to_edm_sigma(end))).to(dtype)

    return flow_sampler


def exact_first_step(model, x: torch.Tensor, s: float, s_next: float, extra_args: dict[str, Any],
                     second_order: bool, callback, eta: float, s_noise: float,
                     noise: NoiseSampler) -> torch.Tensor:
    """The flow DDIM step from s (pure noise) to s_next with the sampler's eta, counted as step 0.

    ``second_order``: the sampler calls the model twice per step, so this step does too (a trapezoid in
    rho = 1/s between s and s_next, as PLMS's first step), and the call count stays A1111's.
    """
    level = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
    denoised = model(x, level, **extra_args)
    if second_order and s_next > 0:
        x_pred = s_next / s * x + (1 - s_next / s) * denoised
        denoised = (denoised + model(x_pred, torch.full_like(level, s_next), **extra_args)) / 2
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": level[0], "sigma_hat": level[0], "denoised": denoised})
    next_level = torch.full_like(level[:1], s_next)[0]
    return ddim_step(x, s, s_next, denoised, denoised, eta, lambda _a, _b: s_noise * noise(level[0], next_level))


def last_step_to_zero(model, x: torch.Tensor, s: torch.Tensor, extra_args: dict[str, Any], callback,
                      step: int) -> torch.Tensor:
    """The one step from level s to 0: every k-diffusion sampler returns the denoised prediction there
    (an Euler step, zero noise). Taken here because the multistep SDE solvers cannot take it alone."""
    denoised = model(x, s * x.new_ones([x.shape[0]]), **extra_args)
    if callback is not None:
        callback({"x": x, "i": step, "sigma": s, "sigma_hat": s, "denoised": denoised})
    return denoised


def from_pure_noise(sampler: Callable[..., torch.Tensor], second_order: bool = False,
                    eta: float = 0.0) -> Callable[..., torch.Tensor]:
    """Wrap a flow-space sampler on a schedule so that the step from pure noise (s = 1) is the exact flow one.

    From s = 1 (sigma_edm = inf) no EDM step is well posed: a midpoint or multistep method would extrapolate
    across ~1e4 in sigma. The first step is flow DDIM with the sampler's eta (fresh noise for ancestral
    samplers; ``second_order``: two model calls, as the sampler's own step), then ``sampler`` runs the rest.
    ``eta`` is the first step's eta when a call passes none: A1111 passes its eta option to every sampler that
    takes one, so that is a sampler without eta (Restart, churn), or a direct call (k-diffusion's own default is 1).
    A rest of one step to 0 is :func:`last_step_to_zero` (k-diffusion's multistep SDE loops fail on it,
    and A1111 gives them that at 1 and 2 steps).
    """

    @functools.wraps(sampler)
    def run(model, x, *args, extra_args=None, callback=None, disable=None, **kwargs):
        if args or "sigmas" not in kwargs:
            return sampler(model, x, *args, extra_args=extra_args, callback=callback, disable=disable, **kwargs)
        sigmas, step = kwargs["sigmas"], 0
        if len(sigmas) > 1 and float(sigmas[0]) >= 1.0 - EDM_CAP:
            flow_noise = noise_or_seeded(x, kwargs.get("noise_sampler"))
            x = exact_first_step(model, x, float(sigmas[0]), float(sigmas[1]), extra_args or {}, second_order,
                                 callback, kwargs.get("eta", eta), kwargs.get("s_noise", 1.0), flow_noise)
            sigmas, step = sigmas[1:], 1
        if len(sigmas) < 2:
            return x
        if len(sigmas) == 2 and float(sigmas[1]) == 0:
            return last_step_to_zero(model, x, sigmas[0], extra_args or {}, callback, step)
        kwargs["sigmas"] = sigmas
        shifted = (lambda info: callback({**info, "i": info["i"] + step})) if step and callback else callback
        return sampler(model, x, extra_args=extra_args, callback=shifted, disable=disable, **kwargs)

    return run


def edm_route(sampler: Callable[..., torch.Tensor], second_order: bool = False,
              eta: float = 0.0) -> Callable[..., torch.Tensor]:
    """A noise-injecting k-diffusion sampler made exact on flow: :func:`from_pure_noise` around
    :func:`in_edm_space`. ``second_order``: A1111's option of that name (two model calls per step); ``eta``:
    the sampler's own default (see :func:`from_pure_noise`)."""
    return from_pure_noise(in_edm_space(sampler), second_order, eta)
