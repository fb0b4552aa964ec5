"""SD3 MMDiT layer names: sd3-ref / A1111 (canonical) and diffusers, and what each layer does.

Configs are written in the canonical names of Stability's sd3-ref code, which A1111 uses verbatim
(``joint_blocks.3.x_block.attn.qkv``). diffusers' ``SD3Transformer2DModel`` names the same
weights differently and splits each fused qkv into three Linears; :func:`canonical_name` maps a
diffusers name to the canonical one, so one config serves both (a canonical ``qkv`` entry
applies to ``to_q``, ``to_k`` and ``to_v`` alike).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

_BLOCK = r"transformer_blocks\.(\d+)\."
_DIFFUSERS_TO_SD3: tuple[tuple[str, str], ...] = (
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0"),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2"),
    (r"context_embedder", "context_embedder"),
    (_BLOCK + r"norm1\.linear", r"joint_blocks.\1.x_block.adaLN_modulation.1"),
    (_BLOCK + r"norm1_context\.linear", r"joint_blocks.\1.context_block.adaLN_modulation.1"),
    (_BLOCK + r"attn\.to_[qkv]", r"joint_blocks.\1.x_block.attn.qkv"),
    (_BLOCK + r"attn\.add_[qkv]_proj", r"joint_blocks.\1.context_block.attn.qkv"),
    (_BLOCK + r"attn\.to_out\.0", r"joint_blocks.\1.x_block.attn.proj"),
    (_BLOCK + r"attn2\.to_[qkv]", r"joint_blocks.\1.x_block.attn2.qkv"),  # SD3.5 Medium's MMDiT-X layers
    (_BLOCK + r"attn2\.to_out\.0", r"joint_blocks.\1.x_block.attn2.proj"),
    (_BLOCK + r"attn\.to_add_out", r"joint_blocks.\1.context_block.attn.proj"),
    (_BLOCK + r"ff\.net\.0\.proj", r"joint_blocks.\1.x_block.mlp.fc1"),
    (_BLOCK + r"ff\.net\.2", r"joint_blocks.\1.x_block.mlp.fc2"),
    (_BLOCK + r"ff_context\.net\.0\.proj", r"joint_blocks.\1.context_block.mlp.fc1"),
    (_BLOCK + r"ff_context\.net\.2", r"joint_blocks.\1.context_block.mlp.fc2"),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1"),
    (r"proj_out", "final_layer.linear"),
)
_COMPILED = tuple((re.compile(f"^{pattern}$"), target) for pattern, target in _DIFFUSERS_TO_SD3)

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
    for pattern, target in _COMPILED:
        if pattern.match(name):
            return pattern.sub(target, name)
    return name


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
