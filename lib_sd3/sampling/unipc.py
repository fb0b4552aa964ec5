"""UniPC (Zhao et al. 2023), data prediction, in the flow half-log-SNR lambda = log((1 - s) / s)."""

from __future__ import annotations

import math

import torch

from lib_sd3.sampling.flow import half_log_snr
from lib_sd3.sampling.loop import newest, progress


def _lambda(s: float) -> float:
    return float(half_log_snr(torch.tensor(s, dtype=torch.float64)))



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
    older = newest([(lj, dj) for lj, dj in history[:-1] if math.isfinite(lj)], order - 1)
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
    for i in progress(n, disable):
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
        history = newest([*history, (_lambda(s_next), denoised)], order)
    return x

