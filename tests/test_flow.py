"""Flow maths and schedules: conversions invert each other, every schedule keeps the flow contract."""

import math

import pytest
import torch

from lib_sd3.sampling import flow


def test_shift_and_edm_conversions_invert():
    t = torch.linspace(0.001, 1, 50, dtype=torch.float64)
    assert torch.allclose(flow.unshift_time(flow.shift_time(t)), t)
    assert float(flow.shift_time(0.5)) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    s = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(flow.edm_to_flow_sigma(flow.flow_to_edm_sigma(s)), s)
    x0, e = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    for level in (0.1, 0.5, 0.9):
        x_flow = (1 - level) * x0 + level * e
        sigma = flow.flow_to_edm_sigma(level)
        x_edm = x_flow / (1 - level)  # the change of variables lib_sd3.sampling.edm makes
        assert torch.allclose(x_edm, x0 + sigma * e)  # x_edm = x0 + sigma e exactly
        assert torch.allclose(x_edm / (1 + sigma), x_flow)  # and back: 1 - s = 1 / (1 + sigma_edm)
    lam = flow.half_log_snr(torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert lam[0] == 0 and lam[1] == -math.inf and lam[2] == math.inf


SIGMA_MIN = float(flow.shift_time(flow.T_MIN))


def all_schedules(n: int) -> dict[str, torch.Tensor]:
    return {
        "shifted": flow.shifted(n, SIGMA_MIN, 1.0),
        "sgm_uniform": flow.sgm_uniform(n, SIGMA_MIN, 1.0),
        "simple": flow.simple(n),
        "ddim": flow.ddim_uniform(n),
        "karras": flow.karras(n, SIGMA_MIN, 1.0),
        "karras_ve_range": flow.karras(n, 0.1, 10.0),  # A1111's "old Karras sigmas" option passes VE bounds
        "exponential": flow.exponential(n, SIGMA_MIN, 14.6),
        "polyexponential": flow.polyexponential(n, SIGMA_MIN, 1.0, rho=2.0),
        "kl_optimal": flow.kl_optimal(n, SIGMA_MIN, 1.0),
        "beta": flow.beta(n, SIGMA_MIN, 1.0),
        "ays": flow.align_your_steps(n),
    }


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 11, 20, 50])
def test_every_schedule_is_strictly_decreasing_in_unit_interval(n):
    for name, sigmas in all_schedules(n).items():
        assert sigmas.shape == (n + 1,), name
        assert float(sigmas[-1]) == 0.0, name
        assert 0 < float(sigmas[0]) <= 1.0, name
        assert bool(torch.all(sigmas[:-1] > sigmas[1:])), (name, sigmas.tolist())


def test_txt2img_schedules_start_at_pure_noise():
    for name in ("shifted", "sgm_uniform", "simple", "karras", "kl_optimal", "beta", "ays"):
        assert float(all_schedules(20)[name][0]) == pytest.approx(1.0, abs=1e-6), name


def test_model_schedule_matches_sd3_reference_levels():
    # sd3-ref: t uniform from 1 to 1/1000 (n levels), s = shift(t), then 0
    n = 4
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 1 - 0.999 / 3, 1 - 2 * 0.999 / 3, 0.001)] + [0.0]
    assert flow.shifted(n).tolist() == pytest.approx(expected, rel=1e-6)


def test_ays_is_log_snr_mapped_sd15_levels():
    levels = flow.align_your_steps(11)  # the published list has 11 levels
    assert float(levels[0]) == 1.0
    mapped = [v / (1 + v) for v in flow.AYS_SD15_EDM[1:]]
    assert levels[1:-1].tolist() == pytest.approx(mapped, rel=1e-5)
    assert mapped[0] == pytest.approx(0.866, abs=1e-3) and mapped[-1] == pytest.approx(0.0282, abs=1e-4)
    # other step counts interpolate log-linearly between the same end points
    five = flow.align_your_steps(5)
    assert float(five[0]) == 1.0 and float(five[-2]) == pytest.approx(mapped[-1], rel=1e-5)
    assert float(five[2]) == pytest.approx(mapped[4], rel=1e-5)  # position 5 of 0..10 is a table level
    mid = math.exp((math.log(mapped[1]) + math.log(mapped[2])) / 2)  # position 2.5: log-linear midpoint
    assert float(five[1]) == pytest.approx(mid, rel=1e-5)


def test_bad_requests_get_clear_errors():
    with pytest.raises(flow.ScheduleError, match="positive integer"):
        flow.shifted(0)
    with pytest.raises(flow.ScheduleError, match="alpha, beta"):
        flow.beta(5, SIGMA_MIN, 1.0, alpha=0)
