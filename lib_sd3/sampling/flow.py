"""Rectified-flow maths for SD3: shift, flow <-> EDM levels, and schedules in flow space (one table).

SD3 is trained on x_s = (1 - s) x0 + s e with s in [0, 1] (s = 1 is pure noise) and a shifted
time s(t) = m t / (1 + (m - 1) t), m = 3. Samplers written for VE / EDM models expect sigma in
(0, inf) with x = x0 + sigma e. The two are exactly related by x_edm = x / (1 - s),
sigma_edm = s / (1 - s); a schedule built for one space is wrong in the other. Every schedule here
returns flow levels: ``steps + 1`` entries, strictly decreasing, in (0, 1], ending with 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

SD3_SHIFT = 3.0
"""SD3 Medium's time shift m (ModelSamplingDiscreteFlow(shift=3) in A1111 and sd3-ref)."""

TRAIN_TIMESTEPS = 1000
"""Discrete training steps; the model's own levels are s(k / 1000), k = 1..1000."""

T_MIN = 1.0 / TRAIN_TIMESTEPS
"""Smallest unshifted time the model was trained on (its sigma_min is shift(T_MIN) = 0.003 for m = 3)."""

AYS_SD15_EDM = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
"""NVIDIA's published Align-Your-Steps levels for SD1.5 (EDM sigmas, 10 steps). No SD3 list is published."""


def shift_time(t: torch.Tensor | float, shift: float = SD3_SHIFT) -> torch.Tensor | float:
    """s(t) = m t / (1 + (m - 1) t): spends more steps at high noise for large images."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(s: torch.Tensor | float, shift: float = SD3_SHIFT) -> torch.Tensor | float:
    """Inverse of :func:`shift_time`: t = s / (m - (m - 1) s)."""
    return s / (shift - (shift - 1) * s)


def flow_to_edm_sigma(s: torch.Tensor | float) -> torch.Tensor | float:
    """sigma_edm = s / (1 - s); infinite at s = 1."""
    return s / (1 - s)


def edm_to_flow_sigma(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """s = sigma / (1 + sigma): the flow level with the same signal-to-noise ratio."""
    return sigma / (1 + sigma)


def half_log_snr(s: torch.Tensor) -> torch.Tensor:
    """lambda = log((1 - s) / s): -inf at s = 1, +inf at s = 0 (DPM-Solver's time variable for flow)."""
    return torch.log1p(-s) - torch.log(s)


class ScheduleError(ValueError):
    """A schedule request that cannot give steps + 1 strictly decreasing levels in (0, 1]."""


def _finish(levels: torch.Tensor) -> torch.Tensor:
    """Append the final 0 and check the contract every schedule here promises."""
    sigmas = torch.cat([levels.to(torch.float32), levels.new_zeros(1, dtype=torch.float32)])
    if not bool(torch.all(sigmas[:-1] > sigmas[1:])) or not (0 < float(sigmas[0]) <= 1):
        raise ScheduleError(f"schedule is not strictly decreasing in (0, 1]: {sigmas.tolist()}")
    return sigmas


def _check_steps(n: int) -> None:
    if int(n) != n or n < 1:
        raise ScheduleError(f"steps must be a positive integer, got {n!r}")


def _bounds(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Confine a requested range to (0, 1]; A1111 may pass VE values (e.g. 0.1 .. 10 for old Karras)."""
    hi = min(float(sigma_max), 1.0)
    lo = min(max(float(sigma_min), 1e-6), hi * 0.5)
    return lo, hi


def shifted(n: int, sigma_min: float = 0.0, sigma_max: float = 1.0, shift: float = SD3_SHIFT) -> torch.Tensor:
    """The model's own schedule (sd3-ref, A1111 "Automatic" / "Uniform" / "Normal" on SD3).

    t is uniform from t(sigma_max) to t(sigma_min) (n levels), shifted, then 0.
    """
    _check_steps(n)
    lo, hi = _bounds(sigma_min or shift_time(T_MIN, shift), sigma_max)
    t = torch.linspace(unshift_time(hi, shift), unshift_time(lo, shift), n, dtype=torch.float64)
    return _finish(shift_time(t, shift))


def sgm_uniform(n: int, sigma_min: float = 0.0, sigma_max: float = 1.0, shift: float = SD3_SHIFT) -> torch.Tensor:
    """SGM's uniform: n + 1 uniform times from t(sigma_max) to t(sigma_min), the last replaced by 0."""
    _check_steps(n)
    lo, hi = _bounds(sigma_min or shift_time(T_MIN, shift), sigma_max)
    t = torch.linspace(unshift_time(hi, shift), unshift_time(lo, shift), n + 1, dtype=torch.float64)[:-1]
    return _finish(shift_time(t, shift))


def simple(n: int, shift: float = SD3_SHIFT) -> torch.Tensor:
    """A1111's "Simple" in closed form: every (1000 / n)-th of the model's 1000 levels from the top."""
    _check_steps(n)
    if n > TRAIN_TIMESTEPS:
        raise ScheduleError(f"Simple schedule has at most {TRAIN_TIMESTEPS} steps, got {n}")
    k = torch.tensor([TRAIN_TIMESTEPS - int(i * TRAIN_TIMESTEPS / n) for i in range(n)], dtype=torch.float64)
    return _finish(shift_time(k / TRAIN_TIMESTEPS, shift))


def ddim_uniform(n: int, shift: float = SD3_SHIFT) -> torch.Tensor:
    """A1111's "DDIM" scheduler: levels 1 + i * (1000 // n), exactly n of them (A1111 may give n + 1)."""
    _check_steps(n)
    if n > TRAIN_TIMESTEPS - 1:
        raise ScheduleError(f"DDIM schedule has at most {TRAIN_TIMESTEPS - 1} steps, got {n}")
    stride = (TRAIN_TIMESTEPS - 1) // n
    k = 1 + stride * torch.arange(n - 1, -1, -1, dtype=torch.float64)  # model index, sigmas[k] = s((k + 1) / 1000)
    return _finish(shift_time((k + 1) / TRAIN_TIMESTEPS, shift))


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al.'s rho-ramp between flow levels confined to (0, 1]."""
    _check_steps(n)
    lo, hi = _bounds(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return _finish((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma between flow levels confined to (0, 1]."""
    _check_steps(n)
    lo, hi = _bounds(sigma_min, sigma_max)
    return _finish(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polynomial-in-log-sigma ramp, confined to (0, 1]."""
    _check_steps(n)
    lo, hi = _bounds(sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _finish(torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """KL-optimal: uniform in arctan(sigma), n levels from sigma_max to sigma_min, then 0."""
    _check_steps(n)
    lo, hi = _bounds(sigma_min, sigma_max)
    w = torch.linspace(0, 1, n, dtype=torch.float64)
    return _finish(torch.tan(w * math.atan(lo) + (1 - w) * math.atan(hi)))


def beta(n: int, sigma_min: float, sigma_max: float, shift: float = SD3_SHIFT, alpha: float = 0.6,
         beta_: float = 0.6) -> torch.Tensor:
    """"Beta Sampling is All You Need" (Lee et al. 2024): unshifted times at Beta(alpha, beta) quantiles."""
    _check_steps(n)
    if alpha <= 0 or beta_ <= 0:
        raise ScheduleError(f"Beta schedule needs alpha, beta > 0, got {alpha}, {beta_}")
    from scipy import stats  # A1111 ships scipy; imported here so the rest of the module does not need it

    lo, hi = _bounds(sigma_min or shift_time(T_MIN, shift), sigma_max)
    t_lo, t_hi = unshift_time(lo, shift), unshift_time(hi, shift)
    q = torch.tensor(stats.beta.ppf([1 - i / max(n - 1, 1) for i in range(n)], alpha, beta_), dtype=torch.float64)
    return _finish(shift_time(t_lo + q * (t_hi - t_lo), shift))


def loglinear_interp(levels: Sequence[float], n: int) -> torch.Tensor:
    """n levels log-linearly interpolated along a decreasing list, endpoints kept (NVIDIA's AYS recipe)."""
    logs = torch.tensor([math.log(v) for v in levels], dtype=torch.float64)
    if n == 1:
        return logs[:1].exp()
    pos = torch.linspace(0, len(levels) - 1, n, dtype=torch.float64)
    left = pos.floor().clamp(max=len(levels) - 2).long()
    frac = pos - left
    return torch.exp(logs[left] * (1 - frac) + logs[left + 1] * frac)


def ays_levels() -> list[float]:
    """SD1.5's AYS levels mapped to flow by matching log-SNR (s = sigma / (1 + sigma)), starting at 1.0.

    The first AYS level is SD1.5's sigma_max, its pure-noise level; the flow model's pure-noise level
    is s = 1, so that level becomes 1.0. This is a heuristic: it ignores SD3's shift and has not
    been validated against a schedule optimised for SD3.
    """
    return [1.0] + [edm_to_flow_sigma(v) for v in AYS_SD15_EDM[1:]]


def align_your_steps(n: int) -> torch.Tensor:
    """AYS for flow: :func:`ays_levels` interpolated log-linearly to n levels, then 0."""
    _check_steps(n)
    return _finish(loglinear_interp(ays_levels(), n))


AYS_DESCRIPTION = "AYS SD1.5 levels mapped by log-SNR s=sigma/(1+sigma), start 1.0"
"""What the infotext says was used for Align Your Steps on SD3."""


@dataclasses.dataclass(frozen=True)
class ScheduleRequest:
    """What A1111's scheduler call asks for: steps, its level range, the model's shift and the options it reads."""

    n: int
    sigma_min: float
    sigma_max: float
    shift: float = SD3_SHIFT
    rho: float | None = None
    beta_alpha: float = 0.6
    beta_beta: float = 0.6


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One of A1111's schedulers in flow form, and what the infotext says was used."""

    levels: Callable[[ScheduleRequest], torch.Tensor]
    description: str = ""


def _in_flow_space(name: str) -> str:
    return f"{name} in flow space (0,1]"


SCHEDULES: dict[str, Schedule] = {
    "automatic": Schedule(lambda r: shifted(r.n, r.sigma_min, r.sigma_max, r.shift)),
    "uniform": Schedule(lambda r: shifted(r.n, r.sigma_min, r.sigma_max, r.shift)),
    "normal": Schedule(lambda r: shifted(r.n, r.sigma_min, r.sigma_max, r.shift)),
    "sgm_uniform": Schedule(lambda r: sgm_uniform(r.n, r.sigma_min, r.sigma_max, r.shift)),
    "simple": Schedule(lambda r: simple(r.n, r.shift)),
    "ddim": Schedule(lambda r: ddim_uniform(r.n, r.shift)),
    "karras": Schedule(lambda r: karras(r.n, r.sigma_min, r.sigma_max, 7.0 if r.rho is None else r.rho)),
    "exponential": Schedule(lambda r: exponential(r.n, r.sigma_min, r.sigma_max)),
    "polyexponential": Schedule(lambda r: polyexponential(r.n, r.sigma_min, r.sigma_max, 1.0 if r.rho is None else r.rho)),
    "kl_optimal": Schedule(lambda r: kl_optimal(r.n, r.sigma_min, r.sigma_max)),
    "beta": Schedule(lambda r: beta(r.n, r.sigma_min, r.sigma_max, r.shift, r.beta_alpha, r.beta_beta)),
    "align_your_steps": Schedule(lambda r: align_your_steps(r.n), AYS_DESCRIPTION),
}
"""A1111's scheduler names (sd_schedulers.py) and their flow forms: "Automatic", "Uniform" and "Normal" are the
model's own shifted schedule; the rest keep their formulas, confined to (0, 1]."""

SCHEDULE_NAMES = tuple(SCHEDULES)
"""A1111's scheduler names (sd_schedulers.py) that have a flow form here."""


def schedule(name: str, n: int, sigma_min: float, sigma_max: float, shift: float = SD3_SHIFT,
             rho: float | None = None, beta_alpha: float = 0.6, beta_beta: float = 0.6) -> torch.Tensor:
    """The flow form of A1111's scheduler ``name`` (a name from :data:`SCHEDULES`)."""
    if name not in SCHEDULES:
        raise ScheduleError(f"no flow form for scheduler {name!r}; known: {', '.join(SCHEDULE_NAMES)}")
    return SCHEDULES[name].levels(ScheduleRequest(n, sigma_min, sigma_max, shift, rho, beta_alpha, beta_beta))


def describe_schedule(name: str) -> str:
    """Infotext text for the flow schedule used (AYS says which heuristic it is)."""
    return SCHEDULES[name].description or _in_flow_space(name)
