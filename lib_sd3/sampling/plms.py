"""PLMS in data-prediction form on the flow ODE dx/ds = (x - D) / s."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lib_sd3.sampling.loop import newest, progress


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
    for i in progress(len(sigmas) - 1, disable):
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
            points = [*newest(history, order - 1), (s, d)]
            weights = adams_bashforth_weights([sj for sj, _ in points], s, s_next)
            d_eff = sum(w * dj for w, (_, dj) in zip(weights, points, strict=True))
        x = x + (s_next - s) * d_eff
        history = newest([*history, (s, d)], order - 1)
    return x

