"""SD3 MMDiT layer names: sd3-ref / A1111 (canonical) and diffusers, and what each layer does.

Configs are written in the canonical names of Stability's sd3-ref code, which A1111 uses verbatim
(``joint_blocks.3.x_block.attn.qkv``). diffusers' ``SD3Transformer2DModel`` names the same
weights differently and splits each fused qkv into three Linears; :func:`canonical_name` maps a
diffusers name to the canonical one (by :mod:`lib_sd3.models.mmdit_keys`' table), so one config serves
both (a canonical ``qkv`` entry applies to ``to_q``, ``to_k`` and ``to_v`` alike).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from lib_sd3.models.mmdit_keys import stability_module

TEXT_STREAM = re.compile(r"^(context_embedder|joint_blocks\.\d+\.context_block\.(attn\.(qkv|proj)|mlp\.fc[12]))$")
"""Linears whose input is the text token sequence, position 0 = CLIP's BOS token."""

TOKENWISE = re.compile(r"^(context_embedder|joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])|"
                       r"final_layer\.linear)$")
"""Linears applied to every token (M = thousands of rows): the ones an int8 GEMM speeds up.
``attn2`` is SD3.5 Medium's second image self-attention (MMDiT-X), treated like ``attn``.
The others (adaLN, timestep / pooled-text embedders) see one row per image."""

PROTECTED = re.compile(r"^(t_embedder|y_embedder|context_embedder|final_layer)\.?")
"""Embedders and the final layer: 1 % of the weights, kept in float by the shipped configs."""


def canonical_name(name: str) -> str:
    """sd3-ref / A1111 name of a layer given either naming (other names are returned unchanged)."""
    found = stability_module(name)
    return found[0] if found else name


def is_text_stream(name: str) -> bool:
    return bool(TEXT_STREAM.match(canonical_name(name)))


def is_tokenwise(name: str) -> bool:
    return bool(TOKENWISE.match(canonical_name(name)))


def role(name: str) -> str:
    """MixDQ's metric-decoupled groups for SD3: ``content`` = text stream and image attention
    (they decide *what* is drawn: measured on structure), ``quality`` = the rest (image MLPs,
    adaLN, embedders, final layer: they decide how clean it is: measured on pixel error)."""
    canonical = canonical_name(name)
    if TEXT_STREAM.match(canonical) or re.match(r"^joint_blocks\.\d+\.x_block\.attn2?\.", canonical):
        return "content"
    return "quality"


def pattern(key: str) -> re.Pattern[str] | None:
    """A config key with ``*`` is a pattern over canonical names: ``*`` stands for one dotted part
    or a piece of one (``joint_blocks.*.*_block.attn.qkv``). One pattern config then fits SD3 Medium,
    SD3.5 Large (38 blocks) and SD3.5 Medium (MMDiT-X ``attn2``) alike. None for a plain name."""
    if "*" not in key:
        return None
    return re.compile("^" + r"[^.]*".join(re.escape(part) for part in key.split("*")) + "$")


def linear_layers(model: nn.Module, include_quantized: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` (A1111's QkvLinear included), and our quantized ones if asked."""
    from lib_sd3.mixdq.qlinear import QuantLinear

    kinds = (nn.Linear, QuantLinear) if include_quantized else (nn.Linear,)
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            yield name, module


def naming(model: nn.Module) -> str:
    """``sd3`` for sd3-ref / A1111's MMDiT, ``diffusers`` for SD3Transformer2DModel, else ``generic``."""
    if hasattr(model, "joint_blocks"):
        return "sd3"
    if hasattr(model, "transformer_blocks"):
        return "diffusers"
    return "generic"
