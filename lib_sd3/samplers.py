"""Samplers that are correct on SD3's rectified flow, and the NaN guard around the denoiser.

Every sampler takes k-diffusion's arguments ``(model, x, sigmas, extra_args, callback, disable, ...)``
with flow levels s in [0, 1] as ``sigmas`` and a ``model(x, s)`` that returns the denoised x0, so
they drop into A1111's k-diffusion sampler class unchanged.

Why these exist (DESIGN.md section 4): the flow ODE dx/ds = (x - D) / s has the same form as the
VE ODE, so k-diffusion's deterministic solvers are already right on flow levels. What is wrong is
(a) A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC), which feed integer timesteps and read
the output as eps, and (b) everything that injects VE noise, because the flow marginal has signal
scale 1 - s, not 1. (a) gets native flow forms below; (b) runs the unchanged k-diffusion sampler in
EDM coordinates (x_edm = x / (1 - s), sigma_edm = s / (1 - s)) where x_edm = x0 + sigma_edm e holds
exactly, which makes every VE noise formula exact.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lib_sd3.flow import edm_to_flow_sigma, flow_to_edm_sigma, half_log_snr, shifted
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


DPM_ADAPTIVE_START = 14.6146 / (1 + 14.6146)
"""Where DPM adaptive starts after the exact first step from pure noise: SD1.5's sigma_max (14.6) as a flow
level (s = 0.936). Its step control (h_init = 0.05 in log sigma, rtol relative to |x|) was tuned from there;
from sigma_edm ~ 1e4 the relative tolerance is 1e4 times the data and early errors go unseen."""


def first_exact_level(kwargs: dict[str, Any], end: float) -> float | None:
    """The level an exact flow step from pure noise goes to before an EDM-space sampler takes over, or None.

    A schedule: its second level (if another step follows). DPM fast (a range and n model calls): the second
    level of the model's own n-step schedule, so that n - 1 calls remain and the step shrinks as n grows.
    DPM adaptive (a range only): :data:`DPM_ADAPTIVE_START`.
    """
    if "sigmas" in kwargs:
        sigmas = kwargs["sigmas"]
        return float(sigmas[1]) if len(sigmas) > 2 else None
    level = float(shifted(int(kwargs["n"]), end)[1]) if "n" in kwargs else DPM_ADAPTIVE_START
    return level if level > end else None


def exact_first_step(model, x: torch.Tensor, s: float, s_next: float, extra_args: dict[str, Any],
                     second_order: bool, callback, eta: float, s_noise: float,
                     noise: NoiseSampler) -> torch.Tensor:
    """The flow DDIM step from s (pure noise) to s_next with the sampler's eta, counted as step 0.

    ``second_order``: the sampler calls the model twice per step, so this step does too (a trapezoid in
    rho = 1/s between s and s_next, as PLMS's first step), and the call count stays A1111's.
    """
    level = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
    denoised = model(x, level, **extra_args)
    if second_order:
        x_pred = s_next / s * x + (1 - s_next / s) * denoised
        denoised = (denoised + model(x_pred, torch.full_like(level, s_next), **extra_args)) / 2
    if callback is not None:
        callback({"x": x, "i": 0, "sigma": level[0], "sigma_hat": level[0], "denoised": denoised})
    next_level = torch.full_like(level[:1], s_next)[0]
    return ddim_step(x, s, s_next, denoised, denoised, eta, lambda _a, _b: s_noise * noise(level[0], next_level))


def in_edm_space(sampler: Callable[..., torch.Tensor], second_order: bool = False) -> Callable[..., torch.Tensor]:
    """Wrap a VE/EDM k-diffusion sampler so that it samples a flow model exactly.

    Inputs in flow space (x at level ``sigmas[0]``, flow ``sigmas`` / ``sigma_min`` / ``sigma_max``,
    a flow ``noise_sampler``) are converted to EDM space, the unchanged sampler runs there against
    D_edm(x_edm, sigma) = D_flow(x_edm / (1 + sigma), sigma / (1 + sigma)), and the result comes back
    as a flow latent. The wrapper keeps the sampler's signature (A1111 inspects it to pick kwargs).
    ``second_order``: the sampler calls the model twice per step (DPM2 a, DPM++ 2S a, DPM++ SDE,
    Restart); the exact first step from pure noise then does too, so the call count stays A1111's.
    """

    eta_param = inspect.signature(sampler).parameters.get("eta")
    eta_default = eta_param.default if eta_param is not None else 0.0

    @functools.wraps(sampler)
    def flow_sampler(model, x, *args, extra_args=None, callback=None, disable=None, **kwargs):
        if args:
            raise TypeError(f"{sampler.__name__} in EDM space takes sigmas and the rest by keyword")
        top = 1.0 - EDM_CAP
        scheduled = "sigmas" in kwargs
        first = float(kwargs["sigmas"][0]) if scheduled else float(kwargs["sigma_max"])
        end = float(kwargs["sigmas"][-1]) if scheduled else float(kwargs["sigma_min"])
        flow_noise = kwargs.get("noise_sampler")
        if flow_noise is not None:  # e.g. A1111's Brownian tree, built over flow levels
            kwargs["noise_sampler"] = lambda s, s_next: flow_noise(edm_to_flow_sigma(s), edm_to_flow_sigma(s_next))
        dtype = x.dtype

        target = first_exact_level(kwargs, end) if first >= top else None
        if target is not None:
            # From pure noise (s = 1, sigma_edm = inf) no EDM step is well posed: a midpoint or multistep
            # method would extrapolate across ~1e4 in sigma, and DPM fast / adaptive would spend their
            # log-sigma steps on (or measure their error against) a state ~1e4 times the latent. The first
            # step is the exact flow one instead (DDIM with the sampler's eta: fresh noise for ancestral
            # samplers), the rest runs in EDM space.
            first_noise = flow_noise if flow_noise is not None else (lambda _s, _s_next: seeded_randn_like(x))
            x = exact_first_step(model, x, first, target, extra_args or {}, second_order, callback,
                                 kwargs.get("eta", eta_default), kwargs.get("s_noise", 1.0), first_noise)
            if scheduled:
                kwargs["sigmas"] = kwargs["sigmas"][1:]
            else:
                kwargs["sigma_max"] = target
                if "n" in kwargs:
                    kwargs["n"] = kwargs["n"] - 1
            callback = (lambda info, outer=callback: outer({**info, "i": info["i"] + 1})) if callback else None

        work = edm_dtype(x)
        if scheduled:
            flow = kwargs["sigmas"].clamp(max=top)
            kwargs["sigmas"] = flow_to_edm_sigma(flow).to(work)
            start = float(flow[0])
        else:
            start = min(float(kwargs["sigma_max"]), top)
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

    flow_sampler.__sd3_edm__ = True
    return flow_sampler


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


def guarded_denoiser(model: Callable[..., torch.Tensor], guard: NanGuard, sampler: str,
                     sigmas: torch.Tensor) -> Callable[..., torch.Tensor]:
    """``model`` behind ``guard``; a failure names the sampler, the step and the sigma."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return guard(model, x, sigma, what="SD3 denoiser", where=lambda: describe_step(sampler, sigmas, sigma), **kwargs)

    return denoise
