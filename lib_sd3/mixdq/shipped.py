"""The shipped W8A8, W4A8 and FP8 configs, as name patterns, and the SD3 families' layer lists.

The YAML files in ``configs/`` are :data:`PATTERNS` written out (a test keeps them in sync): one
file per bit mix fits every SD3 family and depth (SD3 Medium, SD3.5 Large, SD3.5 Medium's
MMDiT-X ``attn2``), so the calibration and benchmark code can also expand it to an explicit list
(:func:`preset`) for any model.

- ``w8a8``: every block Linear int8 per-channel; int8 per-token activations on the token-wise
  Linears (attention qkv/proj, MLP fc1/fc2); adaLN Linears keep float activations (one row per
  image: no GEMM to speed up, and they scale every token). Embedders and the final layer stay float.
- ``w4a8``: as ``w8a8`` but int4 (group 64) weights everywhere except the image stream's
  attention (qkv, proj), which keeps int8. Why those: on SDXL-turbo MixDQ's integer programme
  kept self-attention at 8 bits and pushed the low bits into FFN / cross-attention; in SD3 the
  image-stream attention carries the spatial self-attention and is 11 % of the weights, so the
  mix lands at ~0.32 of fp16. This is a structural starting point, *not* a measured allocation:
  no SD3 checkpoint was available when it was written. ``python -m lib_sd3.mixdq calibrate``
  measures sensitivity on the user's own model and solves the allocation for a memory budget.
- ``fp8``: the ``w8a8`` layers with e4m3 weights (per-row scales) and e4m3 per-token activations,
  for GPUs with FP8 tensor cores (``torch._scaled_mm``); elsewhere it dequantizes (weight-only).

SD3.5's ``attn2`` (MMDiT-X) is quantized like ``attn``; its qk-norm weights are RMSNorm, not
Linear, and stay float.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lib_sd3.mixdq import layers
from lib_sd3.mixdq.config import SHIPPED, BitConfig

SD3_MEDIUM_DEPTH = 24
SD3_MEDIUM_HIDDEN = 1536
IMAGE_ATTENTION = re.compile(r"^joint_blocks\.\d+\.x_block\.attn2?\.(qkv|proj)$")
KINDS = SHIPPED  # the config module's one list of shipped names

_TOKENWISE_PATTERNS = ("joint_blocks.*.*_block.attn.qkv", "joint_blocks.*.*_block.attn.proj",
                       "joint_blocks.*.x_block.attn2.qkv", "joint_blocks.*.x_block.attn2.proj",
                       "joint_blocks.*.*_block.mlp.fc1", "joint_blocks.*.*_block.mlp.fc2")
_IMAGE_ATTENTION_PATTERNS = ("joint_blocks.*.x_block.attn.qkv", "joint_blocks.*.x_block.attn.proj",
                             "joint_blocks.*.x_block.attn2.qkv", "joint_blocks.*.x_block.attn2.proj")
_ADALN_PATTERN = "joint_blocks.*.*_block.adaLN_modulation.1"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown preset {kind!r}; known: {', '.join(KINDS)}")


def patterns(kind: str) -> BitConfig:
    """The shipped config ``kind`` as patterns (what ``configs/<kind>.yaml`` holds)."""
    _check_kind(kind)
    int4 = kind == "w4a8"
    weight = dict.fromkeys(_IMAGE_ATTENTION_PATTERNS, 8) if int4 else {}  # listed first: the first match wins
    for key in (*_TOKENWISE_PATTERNS, _ADALN_PATTERN):
        weight.setdefault(key, 4 if int4 else 8)
    return BitConfig(weight=weight, act={key: 8 for key in _TOKENWISE_PATTERNS}, name=kind,
                     weight_format="fp8" if kind == "fp8" else "int")


def sd35_large_linears(depth: int = 38) -> dict[str, tuple[int, int]]:
    """SD3.5 Large (and Large Turbo): SD3 Medium's layout at depth 38, width 64 x 38 = 2432."""
    return sd3_medium_linears(depth, 64 * depth)


def sd35_medium_linears(depth: int = SD3_MEDIUM_DEPTH, x_layers: int = 13) -> dict[str, tuple[int, int]]:
    """SD3.5 Medium (MMDiT-X): SD3 Medium's layers plus ``x_block.attn2`` in blocks 0..12 (9-way adaLN there)."""
    h = SD3_MEDIUM_HIDDEN
    shapes = sd3_medium_linears(depth)
    for i in range(x_layers):
        shapes[f"joint_blocks.{i}.x_block.attn2.qkv"] = (3 * h, h)
        shapes[f"joint_blocks.{i}.x_block.attn2.proj"] = (h, h)
        shapes[f"joint_blocks.{i}.x_block.adaLN_modulation.1"] = (9 * h, h)
    return shapes


def sd3_medium_linears(depth: int = SD3_MEDIUM_DEPTH, hidden: int = SD3_MEDIUM_HIDDEN) -> dict[str, tuple[int, int]]:
    """Canonical name -> (out_features, in_features) of every Linear in SD3 Medium's MMDiT.

    From sd3-ref's MMDiT with depth 24, mlp_ratio 4, adm_in_channels 2048, context 4096, patch 2,
    16 latent channels; the last block's text stream is ``pre_only`` (qkv and a 2-way adaLN only).
    """
    h, mlp = hidden, 4 * hidden
    shapes = {"t_embedder.mlp.0": (h, 256), "t_embedder.mlp.2": (h, h),
              "y_embedder.mlp.0": (h, 2048), "y_embedder.mlp.2": (h, h), "context_embedder": (h, 4096)}
    for i in range(depth):
        for stream in ("context_block", "x_block"):
            pre_only = stream == "context_block" and i == depth - 1
            prefix = f"joint_blocks.{i}.{stream}"
            shapes[f"{prefix}.attn.qkv"] = (3 * h, h)
            if not pre_only:
                shapes[f"{prefix}.attn.proj"] = (h, h)
                shapes[f"{prefix}.mlp.fc1"] = (mlp, h)
                shapes[f"{prefix}.mlp.fc2"] = (h, mlp)
            shapes[f"{prefix}.adaLN_modulation.1"] = ((2 if pre_only else 6) * h, h)
    shapes["final_layer.adaLN_modulation.1"] = (2 * h, h)
    shapes["final_layer.linear"] = (2 * 2 * 16, h)
    return shapes


def preset(kind: str, names: Iterable[str]) -> BitConfig:
    """The shipped ``kind`` rule applied to these layer names (either naming): an explicit list."""
    _check_kind(kind)
    weight: dict[str, int] = {}
    act: dict[str, int] = {}
    for name in names:
        canonical = layers.canonical_name(name)
        if layers.PROTECTED.match(canonical):
            continue
        weight[name] = 4 if kind == "w4a8" and not IMAGE_ATTENTION.match(canonical) else 8
        if layers.is_tokenwise(canonical):
            act[name] = 8
    return BitConfig(weight=weight, act=act, name=kind, weight_format="fp8" if kind == "fp8" else "int")
