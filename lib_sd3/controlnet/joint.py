"""The SD3 Medium ControlNet in diffusers' layout (InstantX canny / pose / tile: ``SD3ControlNetModel`` with
``joint_attention_dim`` set), as diffusers' ``StableDiffusion3ControlNetPipeline`` runs it.

Unlike Stability's SD3.5 ControlNet (:mod:`.model`) it is a small MMDiT of its own: it patch-embeds the noisy
latent with its OWN ``pos_embed`` (patch embedding + centre-cropped position grid), adds ``pos_embed_input``
of the control latent, embeds the raw context with its own ``context_embedder`` and ``(t, pooled)`` with its own
``time_text_embed``, and runs joint blocks (text and image streams; none is pre-only, no qk-norm). Each block's
image output goes through one ``controlnet_blocks`` Linear.

Two conventions of the InstantX files that diffusers' pipeline applies (``force_zeros_for_pooled_projection``,
true for these files, which carry no config of their own): the pooled vector it gets is all zeros, and its
control latent is the VAE latent times the SD3 scale WITHOUT the shift. The control latent handed to a unit is
the usual SD3 latent ``(z - shift) * scale``, so ``shift * scale`` is added back here.

Parameters carry our MMDiT's names (``x_embedder``, ``t_embedder``, ``joint_blocks.N.x_block.attn.qkv``, ...,
:mod:`lib_sd3.models.mmdit_keys`), so the blocks are :class:`lib_sd3.models.mmdit.JointBlock` and LoRA / MixDQ
names work alike; :func:`file_names` says which of the file's tensors fill each one.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lib_sd3.controlnet.detect import DIFFUSERS_POS_EMBED, ControlNetConfig
from lib_sd3.controlnet.preprocess import SD3_LATENT_SCALE, SD3_LATENT_SHIFT
from lib_sd3.models.mmdit import (
    FREQUENCY_EMBEDDING_SIZE,
    Embedder,
    JointBlock,
    PatchEmbed,
    QkvLinear,
    crop_pos_embed,
    timestep_embedding,
)
from lib_sd3.models.mmdit_keys import BLOCK_TABLE, ROW_SWAP_ALWAYS, TOP_TABLE

UNSHIFT = SD3_LATENT_SHIFT * SD3_LATENT_SCALE  # SD3 latent + this = the latent without the shift

# our module -> the file's module(s), in the order they are concatenated (q, k, v for a fused qkv)
_TOP = {target.module: [key] for key, target in TOP_TABLE.items() if target.swap != ROW_SWAP_ALWAYS}
_BLOCK: dict[str, list[str]] = {}
for _key, _target in sorted(BLOCK_TABLE.items(), key=lambda item: item[1].part or 0):
    _BLOCK.setdefault(_target.module, []).append(_key)  # the row swap is for a pre-only block: none here
_OWN = {"pos_embed": DIFFUSERS_POS_EMBED}
_BLOCK_PARAM = re.compile(r"^joint_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_PARAM = re.compile(r"^(.+)\.(weight|bias)$")


def file_names(key: str) -> list[str]:
    """The file's tensor(s) that fill our parameter ``key``, concatenated along the first axis in this order."""
    if key in _OWN:
        return [_OWN[key]]
    if key.startswith(("pos_embed_input.", "controlnet_blocks.")):
        return [key]
    if (match := _BLOCK_PARAM.match(key)) is not None:
        block, module, param = match.groups()
        return [f"transformer_blocks.{block}.{name}.{param}" for name in _BLOCK[module]]
    module, param = _PARAM.match(key).groups()
    return [f"{name}.{param}" for name in _TOP[module]]


class JointControlNet(nn.Module):
    """``hidden_states(latent, x=, t=, context=)`` -> one hidden state per ControlNet block (unscaled)."""

    IGNORED_FILE_KEYS: tuple[str, ...] = ()  # every tensor of the file is used
    file_names = staticmethod(file_names)

    def __init__(self, config: ControlNetConfig, qkv_linear: type[nn.Linear] = QkvLinear, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.config = config
        dim, heads, patch = config.hidden_size, config.num_heads, config.patch_size
        self.x_embedder = PatchEmbed(patch, config.in_channels, dim, dtype, device)
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size ** 2, dim, dtype=dtype,
                                                      device=device))
        self.t_embedder = Embedder(FREQUENCY_EMBEDDING_SIZE, dim, dtype, device)
        self.y_embedder = Embedder(config.pooled_dim, dim, dtype, device)
        self.context_embedder = nn.Linear(config.context_dim, dim, dtype=dtype, device=device)
        self.pos_embed_input = PatchEmbed(patch, config.in_channels, dim, dtype, device)
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, heads, False, None, False, qkv_linear, dtype, device) for _ in range(config.depth))
        self.controlnet_blocks = nn.ModuleList(
            nn.Linear(dim, dim, dtype=dtype, device=device) for _ in range(config.depth))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    def cropped_pos_embed(self, hw: tuple[int, ...]) -> torch.Tensor:
        """The centre crop of its own position grid for an ``h x w`` latent (the base's rule)."""
        return crop_pos_embed(self.pos_embed, hw, self.config.patch_size, self.config.pos_embed_max_size,
                              "the ControlNet's")

    def hidden_states(self, latent: torch.Tensor, *, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                      **_unused: object) -> list[torch.Tensor]:
        """``latent``: the SD3 control latent (B, C, H, W); ``x``: the noisy latent the base gets; ``t``: 1000 sigma
        (B,); ``context``: the raw text context (B, L, context_dim) the base gets."""
        tokens = self.x_embedder(x) + self.cropped_pos_embed(tuple(x.shape[-2:])).to(x.dtype)
        pooled = torch.zeros(x.shape[0], self.config.pooled_dim, dtype=x.dtype, device=x.device)
        c = self.t_embedder(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(x.dtype)) + self.y_embedder(pooled)
        context = self.context_embedder(context)
        tokens = tokens + self.pos_embed_input(latent + UNSHIFT)
        hidden = []
        for block, out in zip(self.joint_blocks, self.controlnet_blocks, strict=True):
            context, tokens = block(context, tokens, c=c)
            hidden.append(out(tokens))
        return hidden
