"""Samplers that are correct on SD3's rectified flow, and the NaN guard around the denoiser.

Every sampler takes k-diffusion's arguments ``(model, x, sigmas, extra_args, callback, disable, ...)``
(DPM fast / adaptive: ``sigma_min, sigma_max``) with flow levels s in [0, 1] and a ``model(x, s)`` that
returns the denoised x0, so they drop into A1111's k-diffusion sampler class unchanged.

The flow ODE dx/ds = (x - D) / s has the VE ODE's form, so k-diffusion's deterministic solvers are right on
flow levels as they are. Wrong on flow are A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC: integer
timesteps, output read as eps), which get native flow forms here, and every VE noise formula, because the
flow marginal's signal scale is 1 - s, not 1. Noise-injecting samplers therefore run unchanged in EDM
coordinates (x_edm = x / (1 - s), sigma_edm = s / (1 - s), where x_edm = x0 + sigma_edm e holds exactly),
after an exact first step from pure noise; DPM fast / adaptive, whose step plan is fixed in log sigma, keep
flow levels and take their ancestral noise in flow form. Rationale and measured figures: docs/samplers.md.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_sd3.flow import edm_to_flow_sigma, flow_to_edm_sigma, half_log_snr
from lib_sd3.nan_guard import NanGuard

EDM_CAP = 1e-4
"""s = 1 is sigma_edm = inf; EDM-space samplers start at s = 1 - EDM_CAP instead (sigma_edm ~ 1e4).
The start then differs from pure noise by O(1e-4) in the signal weight, far below what sampling sees."""

NoiseSampler = Callable[[Any, Any], torch.Tensor]


def seeded_randn_like(x: torch.Tensor) -> torch.Tensor:
    """Noise from ``k_diffusion.sampling.torch``, which A1111 points at its per-image seeded generator, so a
    seed gives the same image at any batch size; plain torch where k-diffusion is not installed."""
    try:
        import k_diffusion.sampling
    except ImportError:
        return torch.randn_like(x)
    return k_diffusion.sampling.torch.randn_like(x).to(x)


def edm_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for the EDM-space state: near s = 1 it is ~1e4 times the latent, and float32 steps there
    lose the digits the next step amplifies back (DPM2 a on a float32 latent: garbage). MPS has no float64."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _noise_sampler(x: torch.Tensor, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    return noise_sampler if noise_sampler is not None else (lambda _s, _s_next: seeded_randn_like(x))


def _last(items: list, k: int) -> list:
    """The newest k items (none for k <= 0; plain slicing gets k = 0 wrong)."""
    return items[max(0, len(items) - k):] if k > 0 else []


def _iter(n: int, disable: bool | None):
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is optional outside A1111
        return range(n)
    return trange(n, disable=disable)


# ---------------------------------------------------------------------------------------------
# Any k-diffusion sampler, run in EDM space


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

        def edm_model(x_edm, sigma, **model_kwargs):
            sigma_b = sigma.reshape(-1, *([1] * (x_edm.ndim - 1)))
            flow_x = (x_edm / (1 + sigma_b)).to(dtype)
            return model(flow_x, edm_to_flow_sigma(sigma).to(dtype), **model_kwargs).to(x_edm.dtype)

        def edm_callback(info: dict) -> None:
            level = info.get("sigma_hat", info.get("sigma"))
            out = dict(info)
            if level is not None:
                out["x"] = info["x"] / (1 + level)
                out["sigma"] = edm_to_flow_sigma(info["sigma"])
                out["sigma_hat"] = edm_to_flow_sigma(level)
            callback(out)

        x_edm = x.to(work) / (1 - start)
        out = sampler(edm_model, x_edm, extra_args=extra_args, callback=edm_callback if callback else None,
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


def from_pure_noise(sampler: Callable[..., torch.Tensor], second_order: bool = False) -> Callable[..., torch.Tensor]:
    """Wrap a flow-space sampler on a schedule so that the step from pure noise (s = 1) is the exact flow one.

    From s = 1 (sigma_edm = inf) no EDM step is well posed: a midpoint or multistep method would extrapolate
    across ~1e4 in sigma. The first step is flow DDIM with the sampler's eta (fresh noise for ancestral
    samplers; ``second_order``: two model calls, as the sampler's own step), then ``sampler`` runs the rest.
    A rest of one step to 0 is :func:`last_step_to_zero` (k-diffusion's multistep SDE loops fail on it,
    and A1111 gives them that at 1 and 2 steps).
    """
    eta_param = inspect.signature(sampler).parameters.get("eta")
    eta_default = eta_param.default if eta_param is not None else 0.0

    @functools.wraps(sampler)
    def run(model, x, *args, extra_args=None, callback=None, disable=None, **kwargs):
        if args or "sigmas" not in kwargs:
            return sampler(model, x, *args, extra_args=extra_args, callback=callback, disable=disable, **kwargs)
        sigmas, step = kwargs["sigmas"], 0
        if len(sigmas) > 1 and float(sigmas[0]) >= 1.0 - EDM_CAP:
            flow_noise = kwargs.get("noise_sampler") or (lambda _s, _s_next: seeded_randn_like(x))
            x = exact_first_step(model, x, float(sigmas[0]), float(sigmas[1]), extra_args or {}, second_order,
                                 callback, kwargs.get("eta", eta_default), kwargs.get("s_noise", 1.0), flow_noise)
            sigmas, step = sigmas[1:], 1
        if len(sigmas) < 2:
            return x
        if len(sigmas) == 2 and float(sigmas[1]) == 0:
            return last_step_to_zero(model, x, sigmas[0], extra_args or {}, callback, step)
        kwargs["sigmas"] = sigmas
        shifted = (lambda info: callback({**info, "i": info["i"] + step})) if step and callback else callback
        return sampler(model, x, extra_args=extra_args, callback=shifted, disable=disable, **kwargs)

    return run


def edm_route(sampler: Callable[..., torch.Tensor], second_order: bool = False) -> Callable[..., torch.Tensor]:
    """A noise-injecting k-diffusion sampler made exact on flow: :func:`from_pure_noise` around
    :func:`in_edm_space`. ``second_order``: A1111's option of that name (two model calls per step)."""
    return from_pure_noise(in_edm_space(sampler), second_order)


# ---------------------------------------------------------------------------------------------
# DDIM and DDIM CFG++ in flow form (alpha = 1 - s, sigma = s)


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
    noise_sampler = _noise_sampler(x, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in _iter(len(sigmas) - 1, disable):
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
    noise_sampler = _noise_sampler(x, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in _iter(len(sigmas) - 1, disable):
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
    noise_sampler = _noise_sampler(x, noise_sampler)
    s_in = x.new_ones([x.shape[0]])
    for i in _iter(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        s_next = float(sigmas[i + 1])
        x = (1 - s_next) * denoised + s_next * noise_sampler(sigmas[i], sigmas[i + 1]) if s_next > 0 else denoised
    return x


def _lambda(s: float) -> float:
    return float(half_log_snr(torch.tensor(s, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# PLMS in data-prediction form on the flow ODE


def adams_bashforth_weights(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Mean over [a, b] of each Lagrange basis polynomial on ``nodes`` (variable-step Adams-Bashforth).

    4-point Gauss-Legendre integrates these (degree <= 3) exactly.
    """
    gauss = ((-0.8611363115940526, 0.3478548451374538), (-0.3399810435848563, 0.6521451548625461),
             (0.3399810435848563, 0.6521451548625461), (0.8611363115940526, 0.3478548451374538))
    mid, half = (a + b) / 2, (b - a) / 2

    def basis(j: int, r: float) -> float:
        return math.prod((r - o) / (nodes[j] - o) for k, o in enumerate(nodes) if k != j)

    return [sum(w * basis(j, mid + half * u) for u, w in gauss) / 2 for j in range(len(nodes))]


@torch.no_grad()
def sample_flow_plms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """PLMS's scheme on the flow ODE dx/ds = (x - D) / s: a pseudo-improved-Euler first step
    (2 model calls), then Adams-Bashforth of growing order (up to 4) on the derivative history.

    A1111's PLMS does the same on eps with DDIM transfers in integer timesteps; on flow levels the
    derivative is well defined at s = 1 (where eps-from-x0 is not), and the coefficients are the
    variable-step ones because no flow schedule is uniform. The step to s = 0 returns D.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    history: list[tuple[float, torch.Tensor]] = []  # (s, dx/ds), newest last
    for i in _iter(len(sigmas) - 1, disable):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if s_next == 0:
            x = denoised
            continue
        d = (x - denoised) / s
        if not history:
            x_pred = x + (s_next - s) * d
            d_next = (x_pred - model(x_pred, sigmas[i + 1] * s_in, **extra_args)) / s_next
            d_eff = (d + d_next) / 2
        else:
            points = [*_last(history, order - 1), (s, d)]
            weights = adams_bashforth_weights([sj for sj, _ in points], s, s_next)
            d_eff = sum(w * dj for w, (_, dj) in zip(weights, points, strict=True))
        x = x + (s_next - s) * d_eff
        history = _last([*history, (s, d)], order - 1)
    return x


# ---------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023), data prediction, in the flow half-log-SNR lambda = log((1 - s) / s)


def _unipc_coefficients(rks: torch.Tensor, hh: float, variant: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """UniPC's order conditions R rho = b for nodes ``rks`` (relative lambda offsets, last = 1)."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, rhs = [], []
    for k in range(1, len(rks) + 1):
        rows.append(rks ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(rhs, dtype=torch.float64), b_h


def _unipc_update(x, s, s_next, history, order, variant, model_next=None):
    """One UniPC predictor (``model_next`` None) or corrector step from (s, history[-1]) to s_next.

    ``history`` holds (lambda, D) with finite lambda except possibly the newest. Returns
    (x_next, x_first_order) where x_first_order is the DDIM/Euler part.
    """
    lam_next = _lambda(s_next)
    lam0, d0 = history[-1]
    h = lam_next - lam0
    x_first = (s_next / s) * x + (1 - s_next / s) * d0  # = sigma'/sigma x - alpha' expm1(-h) D0
    older = _last([(lj, dj) for lj, dj in history[:-1] if math.isfinite(lj)], order - 1)
    if not math.isfinite(h) or (model_next is None and not older):
        return x_first, x_first
    hh = -h
    rks = [(lj - lam0) / h for lj, _ in older[::-1]]
    d1s = [(dj - d0) / rk for rk, (_, dj) in zip(rks, older[::-1], strict=True)]
    alpha_next = 1 - s_next
    coeff_r, coeff_b, b_h = _unipc_coefficients(torch.tensor([*rks, 1.0], dtype=torch.float64), hh, variant)
    if model_next is None:  # predictor: uses the history only
        rhos = [0.5] if len(d1s) == 1 else torch.linalg.solve(coeff_r[:-1, :-1], coeff_b[:-1]).tolist()
        return x_first - alpha_next * b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True)), x_first
    rhos = [0.5] if not d1s else torch.linalg.solve(coeff_r, coeff_b).tolist()
    correction = sum(r * d for r, d in zip(rhos[:-1], d1s, strict=True)) + rhos[-1] * (model_next - d0)
    return x_first - alpha_next * b_h * correction, x_first


@torch.no_grad()
def sample_flow_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, variant="bh1",
                      lower_order_final=True):
    """UniPC-p predictor with UniC corrector on flow levels, one model call per step like A1111's.

    The step from s = 1 (lambda = -inf) is the exact first-order step; history points at
    lambda = -inf are not used for higher orders. The last step to s = 0 returns the denoised
    prediction (as k-diffusion's DPM++ 2M does).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be bh1 or bh2, got {variant!r}")
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    history = [(_lambda(float(sigmas[0])), denoised)]
    for i in _iter(n, disable):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": history[-1][1]})
        if s_next == 0:
            x = history[-1][1]
            continue
        step_order = min(order, i + 1)
        if lower_order_final:  # the last steps jump far in lambda; extrapolating there costs more than it gains
            step_order = min(step_order, n - 1 - i)
        x_pred, _ = _unipc_update(x, s, s_next, history, step_order, variant)
        denoised = model(x_pred, sigmas[i + 1] * s_in, **extra_args)
        x, _ = _unipc_update(x, s, s_next, history, step_order, variant, model_next=denoised)
        history = _last([*history, (_lambda(s_next), denoised)], order)
    return x


# ---------------------------------------------------------------------------------------------
# DPM fast and DPM adaptive (Lu et al. 2022, DPM-Solver) on flow levels


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
        self.noise = _noise_sampler(x, noise_sampler)

    def t(self, s: float) -> torch.Tensor:
        return torch.tensor(-math.log(s), dtype=self.dtype, device=self.device)

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
    the ancestral noise is :func:`ancestral_split`'s instead of VE noise. Like k-diffusion's, it stops at
    sigma_min (A1111 passes the model's lowest level, 0.003 on SD3), not at 0.
    """
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (0 < sigma_min and sigma_max <= 1):
        raise ValueError(f"DPM fast needs flow levels in (0, 1], got sigma_min {sigma_min}, sigma_max {sigma_max}")
    if sigma_min >= sigma_max:  # img2img at (almost) zero strength: nothing to integrate
        return x
    dpm = _FlowDPMSolver(model, x, extra_args, disable, eta, s_noise, noise_sampler, sigma_min)
    orders = dpm_fast_orders(int(n))
    levels = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), len(orders) + 1, dtype=torch.float64)
    levels = levels.neg().exp().tolist()
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


# ---------------------------------------------------------------------------------------------
# The NaN guard (lib_sd3.nan_guard) around the denoiser

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


def guarded_denoiser(model: Callable[..., torch.Tensor], guard: NanGuard, sampler: str,
                     sigmas: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``model`` behind ``guard``; a failure names the sampler, the step and the sigma."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return guard(model, x, sigma, what="SD3 denoiser", where=lambda: describe_step(sampler, sigmas, sigma), **kwargs)

    return denoise
