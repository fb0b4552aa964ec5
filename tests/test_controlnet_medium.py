"""SD3 Medium ControlNets in diffusers' layout (InstantX): our JointControlNet + MMDiT against diffusers'
SD3ControlNetModel + SD3Transformer2DModel on the same tiny random weights, fp32 on the CPU.

The ControlNet file is diffusers' own state dict (what InstantX publish), loaded through our loader and cache; the
base is the tiny SD3-Medium-shaped checkpoint (no qk-norm) in Stability's layout. Oracles:
- each ControlNet block's output: diffusers' ControlNet fed as its pipeline feeds it (zero pooled vector, control
  latent without the VAE shift);
- the whole denoiser call: diffusers' transformer forward itself (no skipped layers), and diffusers' loop with a
  skipped block skipping its addition (``tiny_controlnet.medium_reference_velocity``) under skip-layer guidance.
"""

from __future__ import annotations

import pytest
import torch

from lib_sd3.controlnet.cache import ControlNetCache
from lib_sd3.controlnet.control import ControlStack, ControlUnit, controlling, diffusers_joint_residuals
from lib_sd3.controlnet.detect import ControlNetConfig, ControlNetError, ControlType, check_base, inspect
from lib_sd3.controlnet.joint import JointControlNet
from lib_sd3.controlnet.load import load_controlnet
from lib_sd3.controlnet.preprocess import SD3_LATENT_SCALE, SD3_LATENT_SHIFT
from lib_sd3.sampling.slg import skip_blocks
from tests import tiny_controlnet, tiny_sd35
from tests.test_controlnet_load import SD35_LARGE, SD35_MEDIUM, one_line

TOLERANCE = 1e-4  # max abs, fp32, CPU
SIGMAS = (0.999, 0.6, 0.05)
SD3_MEDIUM = SD35_MEDIUM.__class__(depth=24, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=192,
                                   context_dim=4096, adm_dim=2048)
INSTANTX = ControlNetConfig(depth=6, hidden_size=1536, patch_size=2, in_channels=16, pooled_dim=2048,
                            context_dim=4096, pos_embed_max_size=192)  # InstantX's config.json


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet_medium")
    ref_base = tiny_controlnet.write_medium_base(folder / "sd3_medium.safetensors")
    ref_cns = {depth: tiny_controlnet.write_medium_controlnet(folder / f"sd3_canny_{depth}.safetensors", depth=depth)
               for depth in (2, 3)}
    _, base = tiny_sd35.load_mmdit(folder / "sd3_medium.safetensors")
    cns = {depth: load_controlnet(folder / f"sd3_canny_{depth}.safetensors")[1] for depth in ref_cns}
    return ref_base, ref_cns, base, cns


def inputs(batch: int):
    """(x, context, pooled); batch 2 is a CFG batch: the same x, cond and uncond text."""
    x, context, pooled = tiny_sd35.inputs(seed=3, batch=2)
    if batch == 1:
        return x[:1], context[:1], pooled[:1]
    return torch.cat([x[:1], x[:1]]), context, pooled


def vae_latent(seed: int = 5) -> torch.Tensor:
    """What the VAE gives for the control image, before any shift / scale."""
    return torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def sd3_latent(vae: torch.Tensor) -> torch.Tensor:
    """The control latent a unit gets (A1111's encode_first_stage: the SD3 shift / scale applied)."""
    return (vae - SD3_LATENT_SHIFT) * SD3_LATENT_SCALE


def our_velocity(base, cn, x, t, context, pooled, latent, strength=1.0, skip=()):
    stack = ControlStack([ControlUnit(cn, latent, strength)])
    with skip_blocks(base, skip), controlling(base, stack, 0, 1):
        return base(x, t, y=pooled, context=context)


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_each_block_output_equals_diffusers(models, depth, batch, sigma):
    _, ref_cns, _, cns = models
    x, context, pooled = inputs(batch)
    t = torch.full((batch,), 1000 * sigma)
    vae = vae_latent()
    with torch.no_grad():
        expected = tiny_controlnet.medium_reference_hidden(ref_cns[depth], x, t, context, pooled, vae)
        got = cns[depth].hidden_states(sd3_latent(vae).expand(batch, -1, -1, -1), x=x, t=t, context=context,
                                       tokens=None, pooled=pooled)
    assert len(got) == len(expected) == depth
    for ours, theirs in zip(got, expected, strict=True):
        assert max_err(ours, theirs) < TOLERANCE
        assert theirs.abs().max().item() > 0.1


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_denoiser_with_controlnet_equals_diffusers_forward(models, depth, batch, sigma, strength):
    """diffusers' own transformer forward (nothing after the last block; 3 ControlNet blocks over 4 joint blocks
    exercise its float interval)."""
    ref_base, ref_cns, base, cns = models
    x, context, pooled = inputs(batch)
    t = torch.full((batch,), 1000 * sigma)
    vae = vae_latent()
    with torch.no_grad():
        hidden = tiny_controlnet.medium_reference_hidden(ref_cns[depth], x, t, context, pooled, vae, strength)
        expected = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                            block_controlnet_hidden_states=hidden).sample
        got = our_velocity(base, cns[depth], x, t, context, pooled, sd3_latent(vae), strength)
        bare = base(x, t, y=pooled, context=context)
    assert max_err(got, expected) < TOLERANCE
    assert max_err(got, bare) > 1e-2  # the ControlNet changes the output


@pytest.mark.parametrize("skip", [[1], [0, 1], [3], [1, 2]])
@pytest.mark.parametrize("batch", [1, 2])
def test_skipped_layers_skip_their_residual(models, skip, batch):
    ref_base, ref_cns, base, cns = models
    x, context, pooled = inputs(batch)
    t = torch.full((batch,), 800.0)
    vae = vae_latent()
    with torch.no_grad():
        hidden = tiny_controlnet.medium_reference_hidden(ref_cns[2], x, t, context, pooled, vae)
        expected = tiny_controlnet.medium_reference_velocity(ref_base, x, t, context, pooled, hidden, skip)
        got = our_velocity(base, cns[2], x, t, context, pooled, sd3_latent(vae), skip=skip)
        unskipped = our_velocity(base, cns[2], x, t, context, pooled, sd3_latent(vae))
        diffusers_rule = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                  timestep=t, block_controlnet_hidden_states=hidden, skip_layers=skip).sample
    assert max_err(got, expected) < TOLERANCE
    assert max_err(got, unskipped) > 1e-3
    if any(i < tiny_controlnet.BASE_DEPTH - 1 for i in skip):  # (the last block gets none anyway)
        assert max_err(got, diffusers_rule) > 1e-3  # diffusers adds a skipped block's residual


def test_the_oracle_loop_is_diffusers_forward_without_skips(models):
    """The skip oracle, with nothing skipped, is diffusers' forward: it differs only where it says."""
    ref_base, ref_cns, _, _ = models
    x, context, pooled = inputs(2)
    t = torch.full((2,), 300.0)
    with torch.no_grad():
        hidden = tiny_controlnet.medium_reference_hidden(ref_cns[3], x, t, context, pooled, vae_latent())
        loop = tiny_controlnet.medium_reference_velocity(ref_base, x, t, context, pooled, hidden)
        forward = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                           block_controlnet_hidden_states=hidden).sample
    assert max_err(loop, forward) < TOLERANCE


def test_two_kinds_of_units_add_up_with_the_base_unchanged_after(models):
    ref_base, ref_cns, base, cns = models
    x, context, pooled = inputs(2)
    t = torch.full((2,), 400.0)
    first, second = vae_latent(1), vae_latent(2)
    with torch.no_grad():
        h2 = tiny_controlnet.medium_reference_hidden(ref_cns[2], x, t, context, pooled, first, 0.7)
        h3 = tiny_controlnet.medium_reference_hidden(ref_cns[3], x, t, context, pooled, second, 0.4)
        expected = ref_base(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                            block_controlnet_hidden_states=h2).sample
        both = tiny_controlnet.medium_reference_velocity(ref_base, x, t, context, pooled, h2)
        stack = ControlStack([ControlUnit(cns[2], sd3_latent(first), 0.7), ControlUnit(cns[3], sd3_latent(second), 0.4)])
        with controlling(base, stack, 0, 1):
            got = base(x, t, y=pooled, context=context)
        bare = base(x, t, y=pooled, context=context)
    # oracle for two units: block i gets h2[int(i / 2)] + h3[int(i / (4 / 3))], none after the last
    summed = [h2[int(i / 2)] + h3[int(i / (4 / 3))] for i in range(3)]
    per_block = tiny_controlnet.medium_reference_velocity(ref_base, x, t, context, pooled, summed + [summed[-1]])
    assert max_err(got, per_block) < TOLERANCE
    assert max_err(both, expected) < TOLERANCE and max_err(got, both) > 1e-3
    assert "forward" not in base.__dict__ and torch.equal(bare, base(x, t, y=pooled, context=context))


def test_diffusers_rule_indices():
    hidden = [torch.full((1,), float(k)) for k in range(6)]
    residuals = diffusers_joint_residuals(hidden, 24, skipped=(5,))
    assert [None if r is None else int(r.item()) for r in residuals] == \
        [None if i in (5, 23) else i // 4 for i in range(24)]


def test_file_loads_through_the_cache_with_its_config_and_type(tmp_path):
    base_path = tmp_path / "sd3_medium.safetensors"
    tiny_controlnet.write_medium_base(base_path)
    family, _ = tiny_sd35.load_mmdit(base_path)
    path = tmp_path / "SD3-Controlnet-Pose.safetensors"
    reference = tiny_controlnet.write_medium_controlnet(path)
    cache = ControlNetCache()
    file, model = cache.get(path, family.config, family.label, dtype=torch.float16)
    assert isinstance(model, JointControlNet) and file.control_type is ControlType.SD3M_POSE
    assert file.config == ControlNetConfig(depth=2, hidden_size=256, patch_size=2, in_channels=16, pooled_dim=40,
                                           context_dim=tiny_sd35.CONTEXT_DIM, pos_embed_max_size=10)
    assert {p.dtype for p in model.parameters()} == {torch.float16} and model.pos_embed.dtype == torch.float16
    state = reference.state_dict()
    qkv = model.state_dict()["joint_blocks.1.context_block.attn.qkv.weight"]
    assert torch.equal(qkv, torch.cat([state[f"transformer_blocks.1.attn.add_{n}_proj.weight"] for n in "qkv"]).half())
    assert torch.equal(model.pos_embed, state["pos_embed.pos_embed"].half())
    assert cache.get(path, family.config, family.label, dtype=torch.float16)[1] is model  # kept
    large = tmp_path / "sd3.5_large.safetensors"
    tiny_controlnet.write_base(large, depth=5)  # wider than the Medium base, as the real ones (2432 vs 1536)
    large_family, _ = tiny_sd35.load_mmdit(large)
    with pytest.raises(ControlNetError) as error:
        cache.get(path, large_family.config, large_family.label)
    assert path.name in one_line(error.value) and "does not fit the loaded" in str(error.value)


@pytest.mark.parametrize(("name", "kind"), [
    ("SD3-Controlnet-Canny.safetensors", ControlType.SD3M_CANNY),
    ("instantx_sd3_tile.safetensors", ControlType.SD3M_TILE),
    ("sd3_pose_controlnet.safetensors", ControlType.SD3M_POSE),
    ("diffusion_pytorch_model.safetensors", ControlType.SD3M),
])
def test_type_comes_from_the_name(tmp_path, name, kind):
    path = tmp_path / name
    tiny_controlnet.write_medium_controlnet(path)
    assert inspect(path).control_type is kind


def test_instantx_shapes_fit_sd3_medium_and_not_large():
    check_base(INSTANTX, SD3_MEDIUM, "SD3 Medium")
    with pytest.raises(ControlNetError) as error:
        check_base(INSTANTX, SD35_LARGE, "SD3.5 Large", "SD3-Controlnet-Canny.safetensors")
    assert "width 1536 vs 2432" in one_line(error.value) and "context" not in str(error.value)
    wrong_text = SD3_MEDIUM.__class__(**{**SD3_MEDIUM.__dict__, "context_dim": 2048})
    with pytest.raises(ControlNetError, match="context 4096 vs 2048"):
        check_base(INSTANTX, wrong_text, "odd")


def test_inpainting_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "SD3-Controlnet-Inpainting.safetensors"
    tiny_controlnet.write_medium_controlnet(path, extra_channels=1)
    with pytest.raises(ControlNetError) as error:
        load_controlnet(path)
    assert "inpainting ControlNet" in one_line(error.value)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    state = tiny_controlnet.diffusers_medium_controlnet().state_dict()
    del state["transformer_blocks.1.attn.add_k_proj.weight"]
    path = tmp_path / "sd3_canny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ControlNetError, match="diffusers' layout: 1 missing .*transformer_blocks.1.attn.add_k_proj"):
        load_controlnet(path)


def test_every_sd3_medium_type_scales_the_image_to_minus_one_one():
    from lib_sd3.controlnet.preprocess import scale_for_type

    white, black = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    for kind in (ControlType.SD3M, ControlType.SD3M_CANNY, ControlType.SD3M_POSE, ControlType.SD3M_TILE):
        assert scale_for_type(white, kind).max() == 1.0 and scale_for_type(black, kind).min() == -1.0
    assert scale_for_type(white, ControlType.CANNY).max() == 128.0  # Stability's canny keeps its own


def test_mixdq_follows_the_base_on_both_streams_and_restores_bit_for_bit(tmp_path):
    from lib_sd3.controlnet.quantize import controlnet_key, follow_base
    from lib_sd3.mixdq import config as mixdq_config
    from lib_sd3.mixdq import model as mixdq_model

    assert controlnet_key("joint_blocks.*.context_block.attn.qkv", joint=True) == "joint_blocks.*.context_block.attn.qkv"
    assert controlnet_key("joint_blocks.3.x_block.attn.qkv", joint=True) is None  # one block of the base
    tiny_controlnet.write_medium_base(tmp_path / "base.safetensors")
    tiny_controlnet.write_medium_controlnet(tmp_path / "sd3_canny.safetensors")
    _, base = tiny_sd35.load_mmdit(tmp_path / "base.safetensors")
    _, cn = load_controlnet(tmp_path / "sd3_canny.safetensors")
    x, context, pooled = inputs(2)
    t = torch.full((2,), 500.0)

    def run():
        with torch.no_grad():
            return cn.hidden_states(sd3_latent(vae_latent()), x=x, t=t, context=context)

    before = run()
    mixdq_model.quantize(base, mixdq_config.load("w8a8"))
    assert follow_base(cn, base) == "w8a8 (ControlNet)"
    layers = sorted(mixdq_model.state(cn).originals)
    assert "joint_blocks.1.context_block.attn.qkv" in layers and "joint_blocks.0.x_block.mlp.fc2" in layers
    assert not any(name.startswith(("controlnet_blocks", "context_embedder", "pos_embed")) for name in layers)
    assert any(not torch.equal(a, b) for a, b in zip(run(), before, strict=True))
    mixdq_model.restore(base)
    assert follow_base(cn, base) is None
    assert all(torch.equal(a, b) for a, b in zip(run(), before, strict=True))
