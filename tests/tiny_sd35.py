"""Tiny random SD3 / SD3.5-shaped diffusers transformers and their Stability-layout checkpoints.

The parity oracle: diffusers' ``SD3Transformer2DModel`` implements qk-norm, MMDiT-X and
``skip_layers``; we write its weights under Stability's names with our own key map and load them
through our construction path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lib_sd3.mmdit_keys import diffusers_to_stability

DEPTH = 3
CONTEXT_DIM = 48
ADM_DIM = 40
POS_EMBED_MAX_SIZE = 12  # tokens per side; a 16x16 latent with patch 2 is an 8x8 crop of it

SHAPES = {
    "sd3-medium": {},
    "sd3.5-large": {"qk_norm": "rms_norm"},
    "sd3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
}


def diffusers_model(family: str, seed: int = 0, depth: int = DEPTH, context_dim: int = CONTEXT_DIM,
                    adm_dim: int = ADM_DIM, pos_embed_max_size: int = POS_EMBED_MAX_SIZE):
    """A random diffusers SD3 transformer shaped like ``family`` (every weight random, norms too)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=depth,
                                  attention_head_dim=64, num_attention_heads=depth, joint_attention_dim=context_dim,
                                  caption_projection_dim=64 * depth, pooled_projection_dim=adm_dim,
                                  pos_embed_max_size=pos_embed_max_size, **SHAPES[family])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                param.copy_(1 + 0.5 * noise)  # far from 1, so dropping them shows
            else:
                param.copy_(noise * (0.5 / param.shape[-1] ** 0.5))
    return model.eval()


def stability_checkpoint(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in diffusers_to_stability(model.state_dict()).items()}


def write_checkpoint(path: Path, family: str, seed: int = 0, metadata: dict[str, str] | None = None,
                     depth: int = DEPTH):
    """Write a Stability-layout file for ``family``; returns the diffusers model it came from."""
    from safetensors.torch import save_file

    model = diffusers_model(family, seed, depth)
    save_file(stability_checkpoint(model), str(path), metadata=metadata)
    return model


def inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 16, 16, generator=g), torch.randn(batch, 7, CONTEXT_DIM, generator=g),
            torch.randn(batch, ADM_DIM, generator=g))
