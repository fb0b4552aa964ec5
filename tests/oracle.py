"""Closed-form flow denoiser for Gaussian data: the exact answer samplers are graded against (docs/samplers.md).

If x0 ~ N(mu, c^2) per coordinate, D(x, s) = E[x0 | x_s = x] = mu + (1-s) c^2 / ((1-s)^2 c^2 + s^2) (x - (1-s) mu),
and along the probability-flow ODE z = (x - (1-s) mu) / sqrt((1-s)^2 c^2 + s^2) is constant, so the
end point of every trajectory is mu + c z.
"""

from __future__ import annotations

import math

import torch


class GaussianFlowDenoiser:
    """D(x, s) for x0 ~ N(mu, c^2 I); counts calls; sigma may be a per-sample tensor (k-diffusion style)."""

    def __init__(self, mu: torch.Tensor, c: torch.Tensor) -> None:
        self.mu, self.c = mu, c
        self.calls = 0

    def __call__(self, x: torch.Tensor, s: torch.Tensor, **_kwargs) -> torch.Tensor:
        self.calls += 1
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a = 1 - s
        return self.mu + a * self.c**2 / (a**2 * self.c**2 + s**2) * (x - a * self.mu)

    def endpoint(self, x: torch.Tensor, s: float) -> torch.Tensor:
        """Exact ODE solution at s = 0 from x at level s."""
        z = (x - (1 - s) * self.mu) / torch.sqrt((1 - s) ** 2 * self.c**2 + s**2)
        return self.mu + self.c * z


def make_oracle(dim: int = 8, dtype=torch.float64, seed: int = 0) -> GaussianFlowDenoiser:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=dtype) * 0.5
    c = 0.5 + torch.rand(dim, generator=g, dtype=dtype)
    return GaussianFlowDenoiser(mu, c)


def data_scale(oracle: GaussianFlowDenoiser) -> float:
    return float(torch.sqrt((oracle.mu**2 + oracle.c**2).mean()))


def rms(x: torch.Tensor) -> float:
    return float(torch.sqrt((x**2).mean()))


def fitted_order(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    lx = [math.log(n) for n in steps]
    ly = [math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return -sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)
