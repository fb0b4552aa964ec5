"""Tiny random SD3.5-Large-shaped ControlNets: diffusers' ``SD3ControlNetModel`` (the "8B" form: single-stream
blocks, no position embedding of its own) and its file in Stability's RELEASED key layout, written here with
our own map (diffusers ships no writer for it).

Released layout <- diffusers: ``transformer_blocks.N.adaLN_modulation.1`` <- ``norm1.linear`` (same
shift/scale/gate order), ``attn.qkv`` <- ``attn.to_{q,k,v}`` concatenated, ``attn.proj`` <- ``attn.to_out.0``,
``mlp.fc1`` / ``mlp.fc2`` <- ``ff.net.0.proj`` / ``ff.net.2``; ``pos_embed_input``, ``time_text_embed`` and
``controlnet_blocks`` keep their names; plus ``control_type`` and the unused ``pos_embed.proj``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests import tiny_sd35

BASE_DEPTH = 4  # joint blocks of the tiny base (SD3.5 Large: 38)
CONTROL_DEPTH = 2  # ControlNet blocks (SD3.5 Large: 19): the base adds hidden state i // 2 after block i
BLOCK_RENAMES = (
    (r"norm1\.linear", "adaLN_modulation.1"),
    (r"attn\.to_out\.0", "attn.proj"),
    (r"ff\.net\.0\.proj", "mlp.fc1"),
    (r"ff\.net\.2", "mlp.fc2"),
)
KEEP = ("pos_embed_input.", "time_text_embed.", "controlnet_blocks.")


def diffusers_controlnet(seed: int = 10, depth: int = CONTROL_DEPTH, base_depth: int = BASE_DEPTH,
                         pooled_dim: int = tiny_sd35.ADM_DIM):
    """A random diffusers SD3.5 ("8B") ControlNet fitting the tiny SD3.5 Large base of ``base_depth`` blocks."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    model = SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
                               num_attention_heads=base_depth, joint_attention_dim=None, pooled_projection_dim=pooled_dim,
                               pos_embed_max_size=tiny_sd35.POS_EMBED_MAX_SIZE, use_pos_embed=False,
                               force_zeros_for_pooled_projection=False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # zero-initialised output layers too: every weight random
            param.copy_(torch.randn(param.shape, generator=generator) * (0.5 / param.shape[-1] ** 0.5))
    return model.eval()


def released_state(model, control_type: int) -> dict[str, torch.Tensor]:
    """The diffusers ControlNet's weights under Stability's released names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(KEEP):
            out[key] = tensor
            continue
        match = re.match(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if match is None:
            raise ValueError(f"no released name for {key}")
        block, module, param = match.groups()
        if (part := re.fullmatch(r"attn\.to_([qkv])", module)) is not None:
            qkv.setdefault(f"transformer_blocks.{block}.attn.qkv.{param}", {})[part.group(1)] = tensor
            continue
        for pattern, name in BLOCK_RENAMES:
            if re.fullmatch(pattern, module):
                out[f"transformer_blocks.{block}.{name}.{param}"] = tensor
                break
        else:
            raise ValueError(f"no released name for {key}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    generator = torch.Generator().manual_seed(99)
    out["pos_embed.proj.weight"] = torch.randn(hidden, 16, 2, 2, generator=generator)  # never used
    out["pos_embed.proj.bias"] = torch.randn(hidden, generator=generator)
    out["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    return {k: v.contiguous() for k, v in out.items()}


def write_controlnet(path: Path, control_type: int = 1, seed: int = 10, depth: int = CONTROL_DEPTH,
                     base_depth: int = BASE_DEPTH, dtype: torch.dtype = torch.float32):
    """Write a released-layout file; returns the diffusers model it came from."""
    from safetensors.torch import save_file

    model = diffusers_controlnet(seed, depth, base_depth)
    state = {k: v if k == "control_type" else v.to(dtype) for k, v in released_state(model, control_type).items()}
    save_file(state, str(path))
    return model


def write_base(path: Path, seed: int = 0, depth: int = BASE_DEPTH):
    """The tiny SD3.5-Large-shaped base (qk-norm) in Stability's layout; returns its diffusers transformer."""
    return tiny_sd35.write_checkpoint(path, "sd3.5-large", seed=seed, depth=depth)


def control_latent(seed: int = 5, size: int = 16) -> torch.Tensor:
    return torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))


def reference_hidden(ref_base, ref_cn, x, t, pooled, latent, strength=1.0):
    """diffusers' ControlNet hidden states, fed as its pipeline feeds the 8B ControlNet (the base's pos_embed)."""
    tokens = ref_base.pos_embed(x)
    return ref_cn(hidden_states=tokens, controlnet_cond=latent.repeat(x.shape[0], 1, 1, 1),
                  conditioning_scale=strength, pooled_projections=pooled, timestep=t).controlnet_block_samples


def reference_velocity(ref_base, x, t, context, pooled, hidden, skip=()):
    """Stability's forward_core_with_concat, on diffusers' modules."""
    tokens = ref_base.pos_embed(x)
    temb = ref_base.time_text_embed(t, pooled)
    ctx = ref_base.context_embedder(context)
    blocks = ref_base.transformer_blocks
    interval = len(blocks) // len(hidden)
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        ctx, tokens = block(hidden_states=tokens, encoder_hidden_states=ctx, temb=temb)
        tokens = tokens + hidden[i // interval]
    out = ref_base.proj_out(ref_base.norm_out(tokens, temb))
    b, _, h, w = x.shape
    out = out.reshape(b, h // 2, w // 2, 2, 2, 16)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, 16, h, w)


# SD3 Medium ControlNets in diffusers' layout (InstantX): joint blocks, their own patch / position / text embedding.
MEDIUM_CONTROL_DEPTH = 2  # over the tiny base's 4 joint blocks: block i gets hidden state int(i / 2), none after 3
MEDIUM_POS_EMBED_MAX_SIZE = 10  # its own grid (InstantX: 192), unlike the base's 12: the crop is its own


def diffusers_medium_controlnet(seed: int = 20, depth: int = MEDIUM_CONTROL_DEPTH, base_depth: int = BASE_DEPTH,
                                extra_channels: int = 0):
    """A random diffusers SD3 Medium (InstantX-form) ControlNet fitting the tiny SD3 Medium base: every weight
    random, the position grid too (so using the base's instead shows)."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    hidden = 64 * base_depth
    model = SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
                               num_attention_heads=base_depth, joint_attention_dim=tiny_sd35.CONTEXT_DIM,
                               caption_projection_dim=hidden, pooled_projection_dim=tiny_sd35.ADM_DIM,
                               pos_embed_max_size=MEDIUM_POS_EMBED_MAX_SIZE, extra_conditioning_channels=extra_channels)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (0.5 / param.shape[-1] ** 0.5))
        model.pos_embed.pos_embed.copy_(torch.randn(model.pos_embed.pos_embed.shape, generator=generator))
    return model.eval()


def write_medium_controlnet(path: Path, seed: int = 20, depth: int = MEDIUM_CONTROL_DEPTH,
                            dtype: torch.dtype = torch.float32, extra_channels: int = 0):
    """Write the diffusers ControlNet's own state dict (what InstantX publish); returns the model."""
    from safetensors.torch import save_file

    model = diffusers_medium_controlnet(seed, depth, extra_channels=extra_channels)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def write_medium_base(path: Path, seed: int = 0, depth: int = BASE_DEPTH):
    """The tiny SD3-Medium-shaped base (no qk-norm) in Stability's layout; returns its diffusers transformer."""
    return tiny_sd35.write_checkpoint(path, "sd3-medium", seed=seed, depth=depth)


def medium_reference_hidden(ref_cn, x, t, context, pooled, vae_latent, strength=1.0):
    """diffusers' pipeline feeding an InstantX ControlNet: zero pooled vector, control latent ``vae * scale``
    without the shift (``force_zeros_for_pooled_projection``)."""
    control = (vae_latent * 1.5305).repeat(x.shape[0], 1, 1, 1)
    return ref_cn(hidden_states=x, controlnet_cond=control, conditioning_scale=strength,
                  encoder_hidden_states=context, pooled_projections=torch.zeros_like(pooled),
                  timestep=t).controlnet_block_samples


def medium_reference_velocity(ref_base, x, t, context, pooled, hidden, skip=()):
    """diffusers' SD3Transformer2DModel loop (hidden state int(i / interval), none after the pre-only last block),
    with a skipped block skipping its addition as Stability's reference does."""
    tokens = ref_base.pos_embed(x)
    temb = ref_base.time_text_embed(t, pooled)
    ctx = ref_base.context_embedder(context)
    blocks = ref_base.transformer_blocks
    interval = len(blocks) / len(hidden)
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        ctx, tokens = block(hidden_states=tokens, encoder_hidden_states=ctx, temb=temb)
        if not block.context_pre_only:
            tokens = tokens + hidden[int(i / interval)]
    out = ref_base.proj_out(ref_base.norm_out(tokens, temb))
    b, _, h, w = x.shape
    out = out.reshape(b, h // 2, w // 2, 2, 2, 16)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, 16, h, w)
