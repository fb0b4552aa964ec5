"""A1111's "Uniform" on SD3 (``lib_sd3.sampling.flow.shifted``) against the schedule of Stability's reference script.

Stability's ``sd3_infer.py`` ``get_sigmas`` spaces timesteps uniformly from ``timestep(sigma_max)`` to
``timestep(sigma_min)``, but its ``ModelSamplingDiscreteFlow.sigma_min`` is already shifted (``sigma(1)``),
and ``sigma()`` shifts again: the low end is shifted twice. docs/slg.md states the difference; this keeps
the statement true.
"""

from __future__ import annotations

import torch

from lib_sd3.sampling import flow

SHIFT = 3.0


def stability_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """The reference's schedule, written from its description (timestep = 1000 sigma, sigma(t) = shift(t / 1000))."""
    def sigma(timestep: torch.Tensor) -> torch.Tensor:
        t = timestep / 1000.0
        return shift * t / (1 + (shift - 1) * t)

    levels = sigma(torch.arange(1, 1001, dtype=torch.float64))  # its model_sampling.sigmas
    sigma_min, sigma_max = levels[0], levels[-1]
    timesteps = torch.linspace(float(sigma_max) * 1000, float(sigma_min) * 1000, steps, dtype=torch.float64)
    return torch.cat([sigma(timesteps), timesteps.new_zeros(1)])


def test_uniform_is_stability_except_its_twice_shifted_low_end():
    ours, reference = flow.shifted(4).double(), stability_sigmas(4)
    assert float(ours[0]) == float(reference[0]) == 1.0
    assert round(float(ours[-2]), 4) == 0.0030 and round(float(reference[-2]), 4) == 0.0089  # docs/slg.md
    assert [round(float(s), 4) for s in reference] == [1.0, 0.8577, 0.6022, 0.0089, 0.0]
    assert [round(float(s), 4) for s in ours] == [1.0, 0.8573, 0.6007, 0.0030, 0.0]
    for steps in (4, 28, 40, 50):  # the same schedule once given the reference's lowest level
        assert torch.allclose(flow.shifted(steps, sigma_min=float(stability_sigmas(steps)[-2])).double(),
                              stability_sigmas(steps), atol=1e-6)
        assert not torch.allclose(flow.shifted(steps).double(), stability_sigmas(steps), atol=1e-4)
