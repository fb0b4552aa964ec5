"""Tiny random SD3 / SD3.5-shaped diffusers transformers and their Stability-layout checkpoints.

The parity oracle: diffusers' ``SD3Transformer2DModel`` implements qk-norm, MMDiT-X and
``skip_layers``; we write its weights under Stability's names with our own key map and load them
through our construction path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from lib_sd3.lora.deltas import swap_halves
from lib_sd3.models.families import CheckpointError, Family, detect, read_checkpoint_header
from lib_sd3.models.mmdit import MMDiT
from lib_sd3.models.mmdit_keys import stability_module
from lib_sd3.models.mmdit_load import build_mmdit, check_complete
from lib_sd3.safetensors_file import load_tensors

DEPTH = 3
CONTEXT_DIM = 48
ADM_DIM = 40
POS_EMBED_MAX_SIZE = 12  # tokens per side; a 16x16 latent with patch 2 is an 8x8 crop of it

POS_EMBED = ("pos_embed.pos_embed", "pos_embed")  # a buffer, not a module: renamed as a whole key

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


def swaps_shift_and_scale(stability_module_name: str, depth: int) -> bool:
    """True where diffusers stores ``(scale, shift)`` and sd3-ref ``(shift, scale)``."""
    return stability_module_name in ("final_layer.adaLN_modulation.1",
                                     f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1")


def diffusers_to_stability(state_dict: Mapping[str, torch.Tensor], prefix: str = "model.diffusion_model."
                           ) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict as a Stability-layout checkpoint.

    Raises ValueError naming the first diffusers keys the table does not know, so nothing is
    dropped silently.
    """
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    out: dict[str, torch.Tensor] = {}
    thirds: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key == POS_EMBED[0]:
            out[prefix + POS_EMBED[1]] = tensor
            continue
        module, _, param = key.rpartition(".")
        found = stability_module(module)
        if found is None:
            unknown.append(key)
            continue
        name, part = found
        target = f"{name}.{param}"
        if part is not None:
            thirds.setdefault(target, {})[part] = tensor
        else:
            out[prefix + target] = swap_halves(tensor) if swaps_shift_and_scale(name, depth) else tensor
    if unknown:
        raise ValueError(f"diffusers keys with no Stability name: {unknown[:3]}")
    for target, parts in thirds.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"{target}: only parts {sorted(parts)} of q/k/v found")
        out[prefix + target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


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


def load_mmdit(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Family, MMDiT]:
    """The family and a filled MMDiT (fp32 unless ``dtype``) of a safetensors checkpoint, checked key by key as
    A1111 loads are.

    Built on the meta device, its parameters are the loaded tensors themselves (``assign=True``).
    """
    header = read_checkpoint_header(path)
    family = detect(header.shapes, header.metadata, str(path))
    if family is None:
        raise CheckpointError(f"{Path(path).name}: not an SD3-family checkpoint (no MMDiT keys)")
    model = build_mmdit(family.config, dtype=dtype, device="meta")
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    check_complete(family, expected, header.shapes, Path(path).name)
    tensors = load_tensors(path, (family.prefix + key for key in expected))
    model.load_state_dict({key: tensors.pop(family.prefix + key).to(dtype) for key in expected}, strict=True,
                          assign=True)
    model.dtype = dtype
    return family, model.eval()
