"""Our MMDiT against diffusers' SD3Transformer2DModel on the same weights (the parity oracle)."""

from __future__ import annotations

import pytest
import torch

from lib_sd3.models.families import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from lib_sd3.sampling.slg import skip_blocks
from tests import tiny_sd35

TIMESTEPS = (999.0, 750.0, 400.0, 30.0)
TOLERANCE = 1e-4  # fp32


@pytest.fixture(scope="module", params=[SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / f"{request.param}.safetensors"
    reference = tiny_sd35.write_checkpoint(path, request.param)
    family, ours = tiny_sd35.load_mmdit(path)
    assert family.name == request.param
    return reference, ours


def _both(reference, ours, t: float, skip: list[int] | None = None):
    x, context, pooled = tiny_sd35.inputs()
    timestep = torch.full((x.shape[0],), t)
    with torch.no_grad():
        expected = reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                             timestep=timestep, skip_layers=skip).sample
        with skip_blocks(ours, skip or []):
            got = ours(x, timestep, y=pooled, context=context)
    return expected, got


@pytest.mark.parametrize("t", TIMESTEPS)
def test_output_equals_diffusers(pair, t):
    expected, got = _both(*pair, t)
    assert (got - expected).abs().max().item() < TOLERANCE
    assert expected.abs().max().item() > 0.1  # a real signal, not two zeros


@pytest.mark.parametrize("skip", [[1], [0, 1], [2]])
def test_skipped_layers_equal_diffusers_skip_layers(pair, skip):
    for t in (900.0, 100.0):
        expected, got = _both(*pair, t, skip)
        assert (got - expected).abs().max().item() < TOLERANCE
        unskipped, _ = _both(*pair, t)
        assert (expected - unskipped).abs().max().item() > 1e-3  # skipping changes the output


def test_medium_mmdit_x_blocks_are_built_where_listed(pair):
    _, ours = pair
    dual = [i for i, block in enumerate(ours.joint_blocks) if hasattr(block.x_block, "attn2")]
    assert dual == list(ours.config.x_block_self_attn_layers)


def test_forward_with_autograd_on_gives_the_same_output(pair):
    """Nothing in the forward needs no_grad (the joint attention's out= writes step aside for autograd)."""
    _, ours = pair
    x, context, pooled = tiny_sd35.inputs()
    timestep = torch.full((x.shape[0],), 500.0)
    with torch.no_grad():
        expected = ours(x, timestep, y=pooled, context=context)
    got = ours(x, timestep, y=pooled, context=context)
    assert got.requires_grad and torch.equal(got.detach(), expected)
