"""DPM fast and DPM adaptive (Lu et al. 2022, DPM-Solver) on flow levels, with ancestral noise in flow form
(DPM fast's ancestral img2img: the steps in EDM coordinates, :class:`_EdmDPMSolver`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from lib_sd3.sampling.edm import edm_denoiser, edm_dtype
from lib_sd3.sampling.loop import NoiseSampler, noise_or_seeded


def ancestral_split(s: float, s_next: float, eta: float, floor: float) -> tuple[float, float]:
    """(s_down, noise std) of an ancestral step from s to s_next on flow levels, exact for the flow marginal.

    The flow ("RF") split: the ODE goes down to s_down = s' (1 + (s'/s - 1) eta) (not below ``floor``; at eta 1
    s'^2 / s, the level unpatched A1111 reaches), then x' = (1 - s') / (1 - s_down) x + std z lands on the
    marginal at s'. k-diffusion's split taken in EDM sigmas (sigma_down = sigma'^2 / sigma at eta 1) is exact
    too, but sends s_down to ``floor`` as s -> 1: from an img2img start at 0.84 one third-order step had to
    solve the ODE down to 0.026 and the final variance came out 40 % short. From s = 1 the step is the ODE's:
    pure noise needs no fresh noise.
    """
    if eta == 0 or s_next <= 0 or s >= 1:
        return s_next, 0.0
    s_down = max(s_next * (1 + (s_next / s - 1) * eta), floor)
    keep = s_down * (1 - s_next) / (1 - s_down)  # the noise left in x after the ODE step, rescaled to s'
    return s_down, math.sqrt(max(0.0, s_next**2 - keep**2))


class _FlowDPMSolver:
    """k-diffusion's DPM-Solver steps in ``t = -log s`` on flow levels: its VE steps solve the flow ODE
    dx/ds = (x - D) / s as they are (the two ODEs have the same form); only the ancestral noise needs the
    flow form (:meth:`renoise`)."""

    def __init__(self, model, x: torch.Tensor, extra_args: dict[str, Any] | None, disable: bool | None,
                 eta: float, s_noise: float, noise_sampler: NoiseSampler | None, floor: float) -> None:
        from k_diffusion.sampling import DPMSolver
        from tqdm.auto import tqdm

        self.progress = tqdm(disable=disable)
        self.solver = DPMSolver(model, extra_args, eps_callback=self.progress.update)
        self.dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.device = x.device
        self.eta, self.s_noise, self.floor = eta, s_noise, floor
        self.noise = noise_or_seeded(x, noise_sampler)

    def t_value(self, s: float) -> float:
        return -math.log(s)

    def t(self, s: float) -> torch.Tensor:
        return torch.tensor(self.t_value(s), dtype=self.dtype, device=self.device)

    def plan(self, s_from: float, s_to: float, steps: int) -> list[float]:
        """Levels uniform in the solver's t: DPM-Solver's fixed step."""
        ts = torch.linspace(self.t_value(s_from), self.t_value(s_to), steps + 1, dtype=torch.float64)
        return ts.neg().exp().tolist()

    def denoised(self, x: torch.Tensor, s: float) -> tuple[torch.Tensor, dict]:
        """D(x, s) through the solver's eps cache, so the step that follows reuses this model call."""
        eps, cache = self.solver.eps({}, "eps", x, self.t(s))
        return x - s * eps, cache

    def split(self, s: float, s_next: float) -> tuple[float, float]:
        return ancestral_split(s, s_next, self.eta, self.floor)

    def step(self, x: torch.Tensor, s: float, s_to: float, order: int, cache: dict,
             r1: float = 1 / 2) -> tuple[torch.Tensor, dict]:
        """One DPM-Solver-``order`` step of the ODE from s to s_to."""
        t, t_to = self.t(s), self.t(s_to)
        if order == 1:
            return self.solver.dpm_solver_1_step(x, t, t_to, eps_cache=cache)
        if order == 2:
            return self.solver.dpm_solver_2_step(x, t, t_to, r1=r1, eps_cache=cache)
        return self.solver.dpm_solver_3_step(x, t, t_to, eps_cache=cache)

    def renoise(self, x: torch.Tensor, s: float, s_next: float, s_down: float, std: float) -> torch.Tensor:
        """From the ODE state at s_down to the flow marginal at s_next (nothing to do when eta = 0)."""
        if std == 0:
            return x
        z = self.noise(torch.tensor(s), torch.tensor(s_next))
        return (1 - s_next) / (1 - s_down) * x + std * self.s_noise * z


class _EdmDPMSolver(_FlowDPMSolver):
    """The same steps in EDM coordinates (x / (1 - s), t = -log sigma_edm): DPM-Solver's own form, whose
    polynomial in t approximates the predicted noise, over levels uniform in log sigma_edm. The ancestral
    noise stays :func:`ancestral_split`'s (the same marginal in either coordinates). Used for ancestral img2img
    (a start below pure noise), where the flow form's steps lose variance at few calls: 20 steps, strength 0.6
    (13 calls), eta 1, on the Gaussian oracle: -15 % here +3 % (k-diffusion's own DPM fast in EDM space: +9 %).
    From s = 1 there is no EDM sigma; there the flow form stays."""

    def __init__(self, model, x: torch.Tensor, *args) -> None:
        super().__init__(edm_denoiser(model, x.dtype), x, *args)
        self.flow_dtype, self.dtype = x.dtype, edm_dtype(x)

    def t_value(self, s: float) -> float:
        return -math.log(s / (1 - s))

    def plan(self, s_from: float, s_to: float, steps: int) -> list[float]:
        sigmas = torch.linspace(self.t_value(s_from), self.t_value(s_to), steps + 1, dtype=torch.float64).neg().exp()
        return (sigmas / (1 + sigmas)).tolist()

    def denoised(self, x: torch.Tensor, s: float) -> tuple[torch.Tensor, dict]:
        x_edm = x.to(self.dtype) / (1 - s)
        eps, cache = self.solver.eps({}, "eps", x_edm, self.t(s))
        return (x_edm - s / (1 - s) * eps).to(self.flow_dtype), cache

    def step(self, x: torch.Tensor, s: float, s_to: float, order: int, cache: dict,
             r1: float = 1 / 2) -> tuple[torch.Tensor, dict]:
        x_edm, cache = super().step(x.to(self.dtype) / (1 - s), s, s_to, order, cache, r1)
        return (x_edm * (1 - s_to)).to(self.flow_dtype), cache


def dpm_fast_orders(n: int) -> list[int]:
    """DPM-Solver-fast's plan for n model calls (Lu et al. 2022, section 3.4): third-order steps, the
    remainder in one last step of order n mod 3 (a second- and a first-order step when 3 divides n)."""
    steps = n // 3 + 1
    return [3] * (steps - 2) + [2, 1] if n % 3 == 0 else [3] * (steps - 1) + [n % 3]


@torch.no_grad()
def sample_flow_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                         s_noise=1.0, noise_sampler=None):
    """A1111's DPM fast on flow levels: n model calls in steps uniform in log s from sigma_max to sigma_min.

    With eta = 0 this is k-diffusion's sample_dpm_fast on flow levels, already right for the ODE; with eta > 0
    the ancestral noise is :func:`ancestral_split`'s instead of VE noise, and from below pure noise (img2img)
    the steps are taken in EDM coordinates (:class:`_EdmDPMSolver`). Like k-diffusion's, it stops at
    sigma_min (A1111 passes the model's lowest level, 0.003 on SD3), not at 0.
    """
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (0 < sigma_min and sigma_max <= 1):
        raise ValueError(f"DPM fast needs flow levels in (0, 1], got sigma_min {sigma_min}, sigma_max {sigma_max}")
    if sigma_min >= sigma_max:  # img2img at (almost) zero strength: nothing to integrate
        return x
    solver = _EdmDPMSolver if eta > 0 and sigma_max < 1 else _FlowDPMSolver
    dpm = solver(model, x, extra_args, disable, eta, s_noise, noise_sampler, sigma_min)
    orders = dpm_fast_orders(int(n))
    levels = dpm.plan(sigma_max, sigma_min, len(orders))
    with dpm.progress:
        for i, order in enumerate(orders):
            denoised, cache = dpm.denoised(x, levels[i])
            if callback is not None:
                level = torch.tensor(levels[i])
                callback({"x": x, "i": i, "sigma": level, "sigma_hat": level, "denoised": denoised})
            s_down, std = dpm.split(levels[i], levels[i + 1])
            x, _ = dpm.step(x, levels[i], s_down, order, cache)
            x = dpm.renoise(x, levels[i], levels[i + 1], s_down, std)
    return x


@torch.no_grad()
def sample_flow_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                             rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                             accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None):
    """A1111's DPM adaptive on flow levels: embedded DPM-Solver 2/3 (or 1/2) pairs in t = -log s under
    k-diffusion's PID step-size control, from sigma_max to sigma_min. With eta = 0 this is k-diffusion's
    sample_dpm_adaptive on flow levels (its tolerance is relative to the flow latent, whose scale is the
    data's); with eta > 0 the ancestral noise is :func:`ancestral_split`'s.
    """
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive's order must be 2 or 3, got {order}")
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (0 < sigma_min and sigma_max <= 1):
        raise ValueError(f"DPM adaptive needs flow levels in (0, 1], got sigma_min {sigma_min}, sigma_max {sigma_max}")
    from k_diffusion.sampling import PIDStepSizeController

    dpm = _FlowDPMSolver(model, x, extra_args, disable, eta, s_noise, noise_sampler, sigma_min)
    control = PIDStepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    t, t_end = -math.log(sigma_max), -math.log(sigma_min)
    x_prev, tried = x, 0
    with dpm.progress:
        while t < t_end - 1e-5:
            s, s_next = math.exp(-t), math.exp(-min(t_end, t + control.h))
            denoised, cache = dpm.denoised(x, s)
            s_down, std = dpm.split(s, s_next)
            x_low, cache = dpm.step(x, s, s_down, order - 1, cache, r1=1 / 3)  # shares the 3-step's first node
            x_high, _ = dpm.step(x, s, s_down, order, cache)
            scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
            if control.propose_step(torch.linalg.norm((x_low - x_high) / scale) / x.numel() ** 0.5):
                x_prev, x, t = x_low, dpm.renoise(x_high, s, s_next, s_down, std), -math.log(s_next)
            if callback is not None:
                level = torch.tensor(math.exp(-t))
                callback({"x": x, "i": tried, "sigma": level, "sigma_hat": level, "denoised": denoised})
            tried += 1
    return x

