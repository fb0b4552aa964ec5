"""Our SD3.5 ControlNet + MMDiT against diffusers' SD3ControlNetModel + SD3Transformer2DModel on the same weights.

The files are written in Stability's released layout (tests/tiny_controlnet.py) and loaded through our loader.
Two oracles for the whole denoiser call:
- ``tiny_controlnet.reference_velocity``: Stability's loop (``forward_core_with_concat``: after joint block i
  add hidden state ``i // interval``; a skipped block skips its addition) run on diffusers' modules;
- diffusers' own transformer forward. It differs from the reference in two places, both checked here: it adds
  no residual after the last joint block (``context_pre_only``), and it adds the residual of a skipped block.
"""

from __future__ import annotations

import pytest
import torch

from lib_sd3.controlnet.control import ControlStack, ControlUnit, controlling
from lib_sd3.controlnet.load import load_controlnet
from lib_sd3.sampling.slg import skip_blocks
from tests import tiny_controlnet, tiny_sd35

TOLERANCE = 1e-4  # max abs, fp32, CPU
SIGMAS = (0.999, 0.6, 0.05)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet")
    ref_base = tiny_controlnet.write_base(folder / "base.safetensors")
    ref_cn = tiny_controlnet.write_controlnet(folder / "canny.safetensors", control_type=1)
    _, base = tiny_sd35.load_mmdit(folder / "base.safetensors")
    _, cn = load_controlnet(folder / "canny.safetensors")
    return ref_base, ref_cn, base, cn


def inputs(batch: int):
    """(x, context, pooled); batch 2 is a CFG batch: the same x, cond and uncond text."""
    x, context, pooled = tiny_sd35.inputs(seed=3, batch=2)
    if batch == 1:
        return x[:1], context[:1], pooled[:1]
    return torch.cat([x[:1], x[:1]]), context, pooled


def our_velocity(base, cn, x, t, context, pooled, latent, strength=1.0, skip=(), step=0, steps=1, start=0.0,
                 end=1.0):
    stack = ControlStack([ControlUnit(cn, latent, strength, start, end)])
    with skip_blocks(base, skip), controlling(base, stack, step, steps):
        return base(x, t, y=pooled, context=context)


def denoised(x, sigma, v):
    return x - v * sigma  # ModelSamplingDiscreteFlow.calculate_denoised


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_each_block_output_equals_diffusers(models, batch, sigma):
    ref_base, ref_cn, base, cn = models
    x, _, pooled = inputs(batch)
    t = torch.full((batch,), 1000 * sigma)
    latent = tiny_controlnet.control_latent()
    with torch.no_grad():
        expected = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, latent)
        tokens = base.x_embedder(x) + base.cropped_pos_embed(tuple(x.shape[-2:]))
        got = cn(tokens, latent.expand(batch, -1, -1, -1), t, pooled)
    assert len(got) == len(expected) == tiny_controlnet.CONTROL_DEPTH
    for ours, theirs in zip(got, expected, strict=True):
        assert max_err(ours, theirs) < TOLERANCE
        assert theirs.abs().max().item() > 0.1


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_denoiser_with_controlnet_equals_reference_on_diffusers(models, batch, sigma, strength):
    ref_base, ref_cn, base, cn = models
    x, context, pooled = inputs(batch)
    t = torch.full((batch,), 1000 * sigma)
    latent = tiny_controlnet.control_latent()
    with torch.no_grad():
        hidden = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, latent, strength)
        expected = denoised(x, sigma, tiny_controlnet.reference_velocity(ref_base, x, t, context, pooled, hidden))
        got = denoised(x, sigma, our_velocity(base, cn, x, t, context, pooled, latent, strength))
        bare = denoised(x, sigma, base(x, t, y=pooled, context=context))
    assert max_err(got, expected) < TOLERANCE
    assert max_err(got, bare) > 1e-2  # the ControlNet changes the output


@pytest.mark.parametrize("batch", [1, 2])
def test_diffusers_forward_differs_only_by_the_last_blocks_residual(models, batch):
    """diffusers' transformer forward, with the residual after the last joint block added back by a hook,
    equals ours: the one place diffusers departs from the reference without skipped layers."""
    ref_base, ref_cn, base, cn = models
    x, context, pooled = inputs(batch)
    t = torch.full((batch,), 500.0)
    latent = tiny_controlnet.control_latent()
    with torch.no_grad():
        hidden = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, latent)
        last = ref_base.transformer_blocks[-1]
        interval = len(ref_base.transformer_blocks) // len(hidden)
        add_last = last.register_forward_hook(
            lambda _m, _a, out: (out[0], out[1] + hidden[(len(ref_base.transformer_blocks) - 1) // interval]))
        try:
            expected = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                                block_controlnet_hidden_states=hidden).sample
        finally:
            add_last.remove()
        plain = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                         block_controlnet_hidden_states=hidden).sample
        got = our_velocity(base, cn, x, t, context, pooled, latent)
    assert max_err(got, expected) < TOLERANCE
    assert max_err(got, plain) > 1e-3  # the difference is real


@pytest.mark.parametrize("skip", [[1], [0, 1], [3], [1, 2]])
@pytest.mark.parametrize("batch", [1, 2])
def test_skipped_layers_skip_their_residual_as_the_reference(models, skip, batch):
    ref_base, ref_cn, base, cn = models
    x, context, pooled = inputs(batch)
    t = torch.full((batch,), 800.0)
    latent = tiny_controlnet.control_latent()
    with torch.no_grad():
        hidden = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, latent)
        expected = tiny_controlnet.reference_velocity(ref_base, x, t, context, pooled, hidden, skip)
        got = our_velocity(base, cn, x, t, context, pooled, latent, skip=skip)
        unskipped = our_velocity(base, cn, x, t, context, pooled, latent)
        diffusers_rule = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                  timestep=t, block_controlnet_hidden_states=hidden, skip_layers=skip).sample
    assert max_err(got, expected) < TOLERANCE
    assert max_err(got, unskipped) > 1e-3
    if any(i < tiny_controlnet.BASE_DEPTH - 1 for i in skip):  # (the last block gets none in diffusers anyway)
        assert max_err(got, diffusers_rule) > 1e-3  # diffusers adds a skipped block's residual


def test_strength_zero_and_outside_the_window_are_bit_identical_to_none(models):
    _, _, base, cn = models
    x, context, pooled = inputs(2)
    t = torch.full((2,), 600.0)
    latent = tiny_controlnet.control_latent()
    with torch.no_grad():
        bare = base(x, t, y=pooled, context=context)
        zero = our_velocity(base, cn, x, t, context, pooled, latent, strength=0.0)
        before = our_velocity(base, cn, x, t, context, pooled, latent, step=1, steps=10, start=0.2, end=1.0)
        after = our_velocity(base, cn, x, t, context, pooled, latent, step=9, steps=10, start=0.0, end=0.8)
        inside = our_velocity(base, cn, x, t, context, pooled, latent, step=2, steps=10, start=0.2, end=0.8)
    assert torch.equal(zero, bare) and torch.equal(before, bare) and torch.equal(after, bare)
    assert max_err(inside, bare) > 1e-2
    assert "forward" not in base.__dict__  # restored


def test_two_units_add_up(models):
    ref_base, ref_cn, base, cn = models
    x, context, pooled = inputs(2)
    t = torch.full((2,), 400.0)
    first, second = tiny_controlnet.control_latent(1), tiny_controlnet.control_latent(2)
    with torch.no_grad():
        h1 = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, first, 0.7)
        h2 = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, second, 0.4)
        summed = [a + b for a, b in zip(h1, h2, strict=True)]
        expected = tiny_controlnet.reference_velocity(ref_base, x, t, context, pooled, summed)
        stack = ControlStack([ControlUnit(cn, first, 0.7), ControlUnit(cn, second, 0.4)])
        with controlling(base, stack, 0, 1):
            got = base(x, t, y=pooled, context=context)
    assert max_err(got, expected) < TOLERANCE


def test_forward_is_restored_on_error(models):
    _, _, base, cn = models
    x, context, _ = inputs(1)
    stack = ControlStack([ControlUnit(cn, tiny_controlnet.control_latent())])
    with pytest.raises(ValueError, match="pooled text vector"), torch.no_grad(), controlling(base, stack, 0, 1):
        base(x, torch.full((1,), 500.0), y=None, context=context)
    assert "forward" not in base.__dict__
