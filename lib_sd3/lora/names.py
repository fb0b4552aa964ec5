"""diffusers' SD3 / SD3.5 transformer module names resolved for one model (the table: :mod:`lib_sd3.models.mmdit_keys`).

diffusers splits the fused ``qkv`` Linear of each attention into ``to_q/to_k/to_v`` (image stream) and
``add_q/k/v_proj`` (text stream); a LoRA trained on diffusers therefore adds to one third of the
rows of ``qkv``. diffusers' ``AdaLayerNormContinuous`` (``norm_out`` and the text stream's
``norm1_context`` of the last, pre-only block) chunks its modulation as (scale, shift) where the MMDiT
writes (shift, scale): a delta on those rows must have its two halves swapped.
"""

from __future__ import annotations

import dataclasses

from lib_sd3.models.mmdit_keys import BLOCK_TABLE, ROW_SWAP_ALWAYS, ROW_SWAP_PRE_ONLY, TOP_TABLE, Target

__all__ = ["BLOCK_TABLE", "ROW_SWAP_ALWAYS", "ROW_SWAP_PRE_ONLY", "TOP_TABLE", "Target", "block_indices",
           "diffusers_names"]

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
