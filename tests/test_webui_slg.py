"""Skip-layer guidance wired into A1111's CFG denoiser, against an oracle on a toy MMDiT.

The stand-in denoiser (tests/a1111/cfg_denoiser.py) reproduces the parts of A1111's ``CFGDenoiser.forward``
that SLG rests on. The oracle computes cond, uncond and the skipped-layer cond by running the toy model's
blocks itself, and the window by Stability's rule (``SkipLayerCFGDenoiser``), written out here.
"""

from __future__ import annotations

import types

import pytest
import torch
from a1111.cfg_denoiser import STEPS, CFGDenoiser, DictWithShape
from a1111.models import Model
from a1111.sd3 import ToyMMDiT

from lib_sd3.patching import AttributeSwap
from lib_sd3.webui import infotext, slg
from lib_sd3.webui.generation import GENERATIONS


def oracle_model(model: ToyMMDiT, x, sigma, cond, skip=()):
    context = cond["crossattn"]
    for i, block in enumerate(model.joint_blocks):
        if i not in skip:
            context, x = block(context, x)
    return x * (1 - sigma.view(-1, 1, 1, 1)) + cond["vector"].view(-1, 1, 1, 1)


@pytest.fixture
def wired(monkeypatch):
    swap = AttributeSwap(CFGDenoiser, "combine_denoised", slg.make_combine_denoised)
    swap.apply()
    monkeypatch.setattr(CFGDenoiser, "callbacks", [slg.keep_denoiser_params])
    yield Wired()
    GENERATIONS.finish()
    swap.undo()


class Wired:
    """The SLG feature's view of the generation in progress (``p.sd3.slg``)."""

    start = staticmethod(slg.start)

    @property
    def run(self):
        return slg.running()


def generation(model, **args):
    p = types.SimpleNamespace(sd_model=Model("SD3", diffusion_model=model), extra_generation_params={})
    values = {"slg": True, "slg_layers": (1,), "slg_scale": 2.5, "slg_start": 0.1, "slg_end": 0.5} | args
    return p, values


def conds(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return DictWithShape(crossattn=torch.randn(batch, 5, 4, generator=g, dtype=torch.float64),
                         vector=torch.randn(batch, generator=g, dtype=torch.float64))


def test_inside_the_window_the_formula_outside_plain_cfg(wired):
    torch.manual_seed(0)
    model = ToyMMDiT().double()
    p, args = generation(model)
    wired.start(p, args)
    denoiser = CFGDenoiser(model)
    cond, uncond = conds(2, 1), conds(2, 2)
    cfg, scale, start, end = 4.0, 2.5, 0.1, 0.5
    guided = []
    for step in range(STEPS):
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        sigma = torch.full((2,), 1 - step / STEPS, dtype=torch.float64)
        calls = denoiser.calls
        out = denoiser(x, sigma, uncond, cond, cfg)
        c, u = oracle_model(model, x, sigma, cond), oracle_model(model, x, sigma, uncond)
        plain = u + cfg * (c - u)
        if start * STEPS < step < end * STEPS:  # Stability's SkipLayerCFGDenoiser, strict on both ends
            skipped = oracle_model(model, x, sigma, cond, skip=(1,))
            torch.testing.assert_close(out, plain + scale * (c - skipped), rtol=0, atol=1e-12)
            assert not torch.allclose(out, plain)
            assert denoiser.calls == calls + 2
            guided.append(step)
        else:
            torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)
            assert denoiser.calls == calls + 1
    assert guided == [2, 3, 4]
    assert wired.run.guided_steps == guided
    assert p.extra_generation_params[infotext.SLG] == "layers 1; scale 2.5; steps 0.1-0.5"
    assert not any("forward" in vars(block) for block in model.joint_blocks)  # blocks put back after each pass


def test_reference_window_for_sd35_medium():
    """Stability's SD3.5 Medium config (50 steps, 0.01-0.20) guides steps 1..9."""
    from lib_sd3.sampling.slg import in_window

    assert [i for i in range(50) if in_window(i, 50, 0.01, 0.20)] == list(range(1, 10))


def test_off_or_not_sd3_leaves_cfg_alone(wired):
    model = ToyMMDiT().double()
    p, args = generation(model, slg=False)
    wired.start(p, args)
    assert wired.run is None and infotext.SLG not in p.extra_generation_params
    p.sd_model.is_sd3 = False
    wired.start(p, generation(model)[1])
    assert wired.run is None


def test_layers_outside_the_model_turn_slg_off_with_a_note(wired, caplog):
    model = ToyMMDiT().double()
    p, args = generation(model, slg_layers=(7, 8, 9))
    wired.start(p, args)
    assert wired.run is None
    assert p.extra_generation_params[infotext.SLG].startswith("off (")
    assert "0..2" in p.extra_generation_params[infotext.SLG]


def test_another_denoiser_is_not_touched(wired):
    model = ToyMMDiT().double()
    p, args = generation(model, slg_start=0.0, slg_end=1.0)
    wired.start(p, args)
    mine, other = CFGDenoiser(model), CFGDenoiser(model)
    cond, uncond = conds(1, 1), conds(1, 2)
    x, sigma = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.full((1,), 0.5, dtype=torch.float64)
    mine.step = other.step = 3
    mine(x, sigma, uncond, cond, 3.0)
    wired.run.pending = types.SimpleNamespace(denoiser=mine)  # the params kept belong to another denoiser
    before = other.calls
    x_out = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(other.combine_denoised(x_out, [[(0, 1.0)]], uncond, 3.0),
                               x_out[1:] + 3.0 * (x_out[:1] - x_out[1:]))
    assert other.calls == before
