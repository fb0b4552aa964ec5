"""diffusers' ``SD3Transformer2DModel`` names -> Stability / sd3-ref / A1111 MMDiT names.

One table for the rename, used by the parity tests (a diffusers model becomes a Stability-layout
checkpoint) and usable by anything that meets diffusers names for the MMDiT (LoRA files trained
with diffusers/peft name modules this way). Two things are not plain renames:

- diffusers splits the fused ``qkv`` projection into ``to_q``/``to_k``/``to_v`` (image stream),
  ``add_q_proj``/... (text stream): :func:`stability_module` says which third of ``qkv`` each is.
- diffusers' ``AdaLayerNormContinuous`` (the final layer, and the text stream of the last block)
  emits ``(scale, shift)`` where sd3-ref emits ``(shift, scale)``: the rows are swapped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (diffusers module pattern, Stability module template, index of the q/k/v third or None)
_RENAMES: tuple[tuple[str, str, int | None], ...] = (
    (r"pos_embed\.proj", "x_embedder.proj", None),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", None),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", None),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", None),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", None),
    (r"context_embedder", "context_embedder", None),
    (r"proj_out", "final_layer.linear", None),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "joint_blocks.{0}.x_block.attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "joint_blocks.{0}.x_block.attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "joint_blocks.{0}.x_block.attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "joint_blocks.{0}.context_block.attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "joint_blocks.{0}.context_block.attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "joint_blocks.{0}.context_block.attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q", "joint_blocks.{0}.x_block.attn.ln_q", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k", "joint_blocks.{0}.x_block.attn.ln_k", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q", "joint_blocks.{0}.context_block.attn.ln_q", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k", "joint_blocks.{0}.context_block.attn.ln_k", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "joint_blocks.{0}.x_block.attn.proj", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "joint_blocks.{0}.context_block.attn.proj", None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q", "joint_blocks.{0}.x_block.attn2.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn2\.to_k", "joint_blocks.{0}.x_block.attn2.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_v", "joint_blocks.{0}.x_block.attn2.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q", "joint_blocks.{0}.x_block.attn2.ln_q", None),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k", "joint_blocks.{0}.x_block.attn2.ln_k", None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", "joint_blocks.{0}.x_block.attn2.proj", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "joint_blocks.{0}.x_block.adaLN_modulation.1", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "joint_blocks.{0}.context_block.adaLN_modulation.1", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "joint_blocks.{0}.x_block.mlp.fc1", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "joint_blocks.{0}.x_block.mlp.fc2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "joint_blocks.{0}.context_block.mlp.fc1", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "joint_blocks.{0}.context_block.mlp.fc2", None),
)
_COMPILED = tuple((re.compile(f"^{pattern}$"), template, part) for pattern, template, part in _RENAMES)

POS_EMBED = ("pos_embed.pos_embed", "pos_embed")  # a buffer, not a module: renamed as a whole key


def stability_module(diffusers_module: str) -> tuple[str, int | None] | None:
    """``("joint_blocks.3.x_block.attn.qkv", 0)`` for ``transformer_blocks.3.attn.to_q``; None if unknown.

    The second item is which third of the fused ``qkv`` the diffusers module is (q=0, k=1, v=2).
    """
    for pattern, template, part in _COMPILED:
        match = pattern.match(diffusers_module)
        if match:
            return template.format(*match.groups()), part
    return None


def swaps_shift_and_scale(stability_module_name: str, depth: int) -> bool:
    """True where diffusers stores ``(scale, shift)`` and sd3-ref ``(shift, scale)``."""
    return stability_module_name in ("final_layer.adaLN_modulation.1",
                                     f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


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
