"""diffusers' ``SD3Transformer2DModel`` names -> Stability / sd3-ref / A1111 MMDiT names.

One table for the rename (``TOP_TABLE``, ``BLOCK_TABLE``, ``NORM_TABLE``), used by the LoRA key normaliser
(:mod:`lib_sd3.lora.names`: LoRA files trained with diffusers/peft name modules this way) and MixDQ's layer
names (:mod:`lib_sd3.mixdq.layers`); the tests turn a diffusers model into a Stability-layout checkpoint with it. Two things are not plain renames:

- diffusers splits the fused ``qkv`` projection into ``to_q``/``to_k``/``to_v`` (image stream),
  ``add_q_proj``/... (text stream): :func:`stability_module` says which third of ``qkv`` each is.
- diffusers' ``AdaLayerNormContinuous`` (the final layer, and the text stream of the last block)
  emits ``(scale, shift)`` where sd3-ref emits ``(shift, scale)``: the rows are swapped.
"""

from __future__ import annotations

import dataclasses
import re

ROW_SWAP_PRE_ONLY = "pre_only"  # swap halves only where the text block is pre-only (no attn.proj)
ROW_SWAP_ALWAYS = "always"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a diffusers module's delta lands in the MMDiT.

    ``part`` is the row block (0 q, 1 k, 2 v) of ``parts`` equal blocks, or None for the whole weight.
    ``swap`` names when the (scale, shift) halves of the rows must be exchanged.
    """

    module: str
    part: int | None = None
    parts: int = 1
    swap: str | None = None


def _qkv(stability: str, part: int) -> Target:
    return Target(stability, part, 3)


BLOCK_TABLE: dict[str, Target] = {
    # image stream (diffusers "attn" / "ff" / "norm1")
    "attn.to_q": _qkv("x_block.attn.qkv", 0),
    "attn.to_k": _qkv("x_block.attn.qkv", 1),
    "attn.to_v": _qkv("x_block.attn.qkv", 2),
    "attn.to_out.0": Target("x_block.attn.proj"),
    "ff.net.0.proj": Target("x_block.mlp.fc1"),
    "ff.net.2": Target("x_block.mlp.fc2"),
    "norm1.linear": Target("x_block.adaLN_modulation.1"),
    # text stream
    "attn.add_q_proj": _qkv("context_block.attn.qkv", 0),
    "attn.add_k_proj": _qkv("context_block.attn.qkv", 1),
    "attn.add_v_proj": _qkv("context_block.attn.qkv", 2),
    "attn.to_add_out": Target("context_block.attn.proj"),
    "ff_context.net.0.proj": Target("context_block.mlp.fc1"),
    "ff_context.net.2": Target("context_block.mlp.fc2"),
    "norm1_context.linear": Target("context_block.adaLN_modulation.1", swap=ROW_SWAP_PRE_ONLY),
    # SD3.5 Medium (MMDiT-X): the second, image-only self-attention
    "attn2.to_q": _qkv("x_block.attn2.qkv", 0),
    "attn2.to_k": _qkv("x_block.attn2.qkv", 1),
    "attn2.to_v": _qkv("x_block.attn2.qkv", 2),
    "attn2.to_out.0": Target("x_block.attn2.proj"),
}
"""Per joint block: ``transformer_blocks.N.<key>`` -> ``joint_blocks.N.<module>``."""

TOP_TABLE: dict[str, Target] = {
    "pos_embed.proj": Target("x_embedder.proj"),
    "time_text_embed.timestep_embedder.linear_1": Target("t_embedder.mlp.0"),
    "time_text_embed.timestep_embedder.linear_2": Target("t_embedder.mlp.2"),
    "time_text_embed.text_embedder.linear_1": Target("y_embedder.mlp.0"),
    "time_text_embed.text_embedder.linear_2": Target("y_embedder.mlp.2"),
    "context_embedder": Target("context_embedder"),
    "norm_out.linear": Target("final_layer.adaLN_modulation.1", swap=ROW_SWAP_ALWAYS),
    "proj_out": Target("final_layer.linear"),
}
"""Modules outside the joint blocks."""

NORM_TABLE: dict[str, str] = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}
"""Per joint block: SD3.5's qk-norm RMSNorms (weights only; no LoRA targets them)."""

# (diffusers module pattern, Stability module template, index of the q/k/v third or None), built from the tables
_RENAMES: tuple[tuple[str, str, int | None], ...] = (
    *((re.escape(key), target.module, target.part) for key, target in TOP_TABLE.items()),
    *((rf"transformer_blocks\.(\d+)\.{re.escape(key)}", "joint_blocks.{0}." + target.module, target.part)
      for key, target in BLOCK_TABLE.items()),
    *((rf"transformer_blocks\.(\d+)\.{re.escape(key)}", "joint_blocks.{0}." + module, None)
      for key, module in NORM_TABLE.items()),
)
_COMPILED = tuple((re.compile(f"^{pattern}$"), template, part) for pattern, template, part in _RENAMES)

def stability_module(diffusers_module: str) -> tuple[str, int | None] | None:
    """``("joint_blocks.3.x_block.attn.qkv", 0)`` for ``transformer_blocks.3.attn.to_q``; None if unknown.

    The second item is which third of the fused ``qkv`` the diffusers module is (q=0, k=1, v=2).
    """
    for pattern, template, part in _COMPILED:
        match = pattern.match(diffusers_module)
        if match:
            return template.format(*match.groups()), part
    return None
