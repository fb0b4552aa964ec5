"""One table: diffusers' SD3 / SD3.5 transformer module names -> the MMDiT's own (Stability) names.

diffusers splits the fused ``qkv`` Linear of each attention into ``to_q/to_k/to_v`` (image stream) and
``add_q/k/v_proj`` (text stream); a LoRA trained on diffusers therefore adds to one third of the
rows of ``qkv``. diffusers' ``AdaLayerNormContinuous`` (``norm_out`` and the text stream's
``norm1_context`` of the last, pre-only block) chunks its modulation as (scale, shift) where the MMDiT
writes (shift, scale): a delta on those rows must have its two halves swapped.
"""

from __future__ import annotations

import dataclasses

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

DIFFUSERS_BLOCKS = "transformer_blocks"
STABILITY_BLOCKS = "joint_blocks"


def block_indices(stability_modules: set[str]) -> list[int]:
    """Indices N of ``joint_blocks.N.*`` present in a model."""
    found = {int(name.split(".")[1]) for name in stability_modules
             if name.startswith(STABILITY_BLOCKS + ".") and name.split(".")[1].isdigit()}
    return sorted(found)


def diffusers_names(stability_modules: set[str]) -> dict[str, Target]:
    """Every diffusers module name that exists for this MMDiT, with its resolved target.

    Built from the model's own module names, so depth, pre-only blocks and SD3.5's ``attn2`` layers
    come from what is there; a ``swap`` is resolved to a plain bool-like value ``ROW_SWAP_ALWAYS``
    or None here.
    """
    out: dict[str, Target] = {}
    for key, target in TOP_TABLE.items():
        if target.module in stability_modules:
            out[key] = target
    for n in block_indices(stability_modules):
        pre_only = f"{STABILITY_BLOCKS}.{n}.context_block.attn.proj" not in stability_modules
        for key, target in BLOCK_TABLE.items():
            module = f"{STABILITY_BLOCKS}.{n}.{target.module}"
            if module not in stability_modules:
                continue
            swap = ROW_SWAP_ALWAYS if target.swap == ROW_SWAP_ALWAYS or (target.swap and pre_only) else None
            out[f"{DIFFUSERS_BLOCKS}.{n}.{key}"] = dataclasses.replace(target, module=module, swap=swap)
    return out
