"""Skip-layer guidance mechanism: exact answers on a tiny MMDiT with A1111's block call convention."""

from __future__ import annotations

import math

import pytest
import torch
from a1111.mmdit import TinyMMDiT

from lib_sd3.sampling.slg import checked_layers, in_window, skip_blocks


def slg_combine(uncond: torch.Tensor, cond: torch.Tensor, cond_skipped: torch.Tensor,
                cfg_scale: float, slg_scale: float) -> torch.Tensor:
    """Stability's reference combination (``SkipLayerCFGDenoiser``), the oracle the WebUI wiring is held to:
    ``uncond + cfg (cond - uncond) + slg (cond - cond_skipped)``.

    Works on whatever the denoiser returns (velocity or denoised x0): the map from one to the other is
    affine in the model output with the same coefficients for every branch, and the weights of the
    three branches sum to 1, so the combination commutes with it.
    """
    return uncond + cfg_scale * (cond - uncond) + slg_scale * (cond - cond_skipped)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.9]) * 1000,
            torch.randn(2, 32, generator=g), torch.randn(2, 5, 48, generator=g))


def _forward_without(model: TinyMMDiT, x, t, y, context, skipped: set[int]) -> torch.Tensor:
    """The reference's loop, written out: ``continue`` over the skipped blocks."""
    b, ch, h, w = x.shape
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    c = model.t_embedder.mlp(torch.cat((torch.cos(args), torch.sin(args)), dim=1)) + model.y_embedder.mlp(y)
    tokens, context = model.x_embedder(x), model.context_embedder(context)
    for i, block in enumerate(model.joint_blocks):
        if i in skipped:
            continue
        context, tokens = block(context, tokens, c)
    out = model.final_layer(tokens, c)
    p = model.patch
    return out.reshape(b, h // p, w // p, p, p, ch).permute(0, 5, 1, 3, 2, 4).reshape(b, ch, h, w)


@pytest.fixture()
def model() -> TinyMMDiT:
    torch.manual_seed(0)
    return TinyMMDiT(depth=4).eval()


@torch.no_grad()
@pytest.mark.parametrize("layers", [[1], [1, 2], [3], [0, 3]])
def test_skipped_blocks_match_the_reference_loop(model, layers):
    args = _inputs()
    with skip_blocks(model, layers) as picked:
        got = model(*args)
    assert picked == tuple(sorted(layers))
    torch.testing.assert_close(got, _forward_without(model, *args, set(layers)), rtol=0, atol=0)
    assert not torch.equal(got, model(*args))


@torch.no_grad()
def test_blocks_are_restored_on_exit_and_on_error(model):
    args = _inputs()
    before = model(*args)
    with pytest.raises(RuntimeError, match="boom"), skip_blocks(model, [1, 2]):
        raise RuntimeError("boom")
    torch.testing.assert_close(model(*args), before, rtol=0, atol=0)
    assert all("forward" not in block.__dict__ for block in model.joint_blocks)


@torch.no_grad()
def test_nested_skips_restore_the_outer_one(model):
    args = _inputs()
    with skip_blocks(model, [1]):
        with skip_blocks(model, [1, 2]):
            inner = model(*args)
        outer = model(*args)
    torch.testing.assert_close(inner, _forward_without(model, *args, {1, 2}), rtol=0, atol=0)
    torch.testing.assert_close(outer, _forward_without(model, *args, {1}), rtol=0, atol=0)


def test_holder_with_diffusion_model_attribute(model):
    holder = torch.nn.Module()
    holder.diffusion_model = model
    with skip_blocks(holder, [0]):
        assert "forward" in model.joint_blocks[0].__dict__
    assert "forward" not in model.joint_blocks[0].__dict__


def test_bad_layers_are_a_clear_error(model):
    with pytest.raises(ValueError, match=r"\[4\].*0\.\.3"), skip_blocks(model, [1, 4]):
        pass
    assert all("forward" not in block.__dict__ for block in model.joint_blocks)
    with pytest.raises(TypeError, match="not an MMDiT"), skip_blocks(torch.nn.Linear(2, 2), [0]):
        pass
    assert checked_layers([9, 7, 8, 7], 24) == (7, 8, 9)


def test_slg_combine_is_the_reference_formula():
    uncond, cond, skipped = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.5])
    # 1 + 4 (3 - 1) + 2.5 (3 - 2.5) = 10.25
    assert slg_combine(uncond, cond, skipped, 4.0, 2.5).item() == 10.25
    assert slg_combine(uncond, cond, skipped, 4.0, 0.0).item() == 9.0


def test_slg_combine_commutes_with_the_velocity_to_denoised_map():
    g = torch.Generator().manual_seed(1)
    x, v_u, v_c, v_s = (torch.randn(3, generator=g, dtype=torch.float64) for _ in range(4))
    sigma = 0.7
    on_velocity = x - slg_combine(v_u, v_c, v_s, 4.0, 2.5) * sigma
    on_denoised = slg_combine(x - v_u * sigma, x - v_c * sigma, x - v_s * sigma, 4.0, 2.5)
    torch.testing.assert_close(on_velocity, on_denoised)


def test_window_follows_the_reference_step_rule():
    # sd3_infer.py SD3.5 Medium: 50 steps, start 0.01, end 0.20 -> 0.5 < step < 10
    assert [s for s in range(50) if in_window(s, 50, 0.01, 0.20)] == list(range(1, 10))
    assert [s for s in range(10) if in_window(s, 10, 0.0, 1.0)] == list(range(1, 10))
    assert not any(in_window(s, 40, 0.2, 0.2) for s in range(40))
