"""The shipped W8A8 and W4A8 configs, as rules over layer names, and SD3 Medium's layer list.

The YAML files in ``configs/`` are these rules applied to SD3 Medium (depth 24); a test keeps
them in sync. Rules rather than a fixed list so the benchmark and tests can build the same mix
for a transformer with fewer blocks.

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
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lib_sd3.mixdq import layers
from lib_sd3.mixdq.config import BitConfig

SD3_MEDIUM_DEPTH = 24
SD3_MEDIUM_HIDDEN = 1536
IMAGE_ATTENTION = re.compile(r"^joint_blocks\.\d+\.x_block\.attn\.(qkv|proj)$")


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
    """The ``w8a8`` or ``w4a8`` rule applied to these layer names (either naming)."""
    if kind not in ("w8a8", "w4a8"):
        raise ValueError(f"unknown preset {kind!r}; known: w8a8, w4a8")
    weight: dict[str, int] = {}
    act: dict[str, int] = {}
    for name in names:
        canonical = layers.canonical_name(name)
        if layers.PROTECTED.match(canonical):
            continue
        weight[name] = 8 if kind == "w8a8" or IMAGE_ATTENTION.match(canonical) else 4
        if layers.is_tokenwise(canonical):
            act[name] = 8
    return BitConfig(weight=weight, act=act, name=kind)
