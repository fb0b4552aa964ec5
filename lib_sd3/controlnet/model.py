"""The SD3.5 ControlNet (Stability's ``ControlNetEmbedder`` on its "8B" path), with the released file's names.

Its input is the BASE model's patch embedding of the noisy latent plus the base's cropped position embedding
(the base hands it over: :data:`lib_sd3.models.mmdit.BlockResiduals`), plus its own patch embedding of the control
latent. Its conditioning is its own timestep embedding of ``t = 1000 sigma`` plus its own embedding of the raw
pooled text vector. Its blocks are single-stream DiT blocks (no text tokens, no qk-norm), chained; each block's
output goes through one ``controlnet_blocks`` Linear. The blocks are :class:`lib_sd3.models.mmdit.DismantledBlock`, so
parameter names (``adaLN_modulation.1``, ``attn.qkv``, ...) are the file's and MixDQ / LoRA names work alike.
"""

from __future__ import annotations

import torch
from torch import nn

from lib_sd3.controlnet.detect import CONTROL_TYPE_KEY, UNUSED_KEYS, ControlNetConfig
from lib_sd3.models.mmdit import (
    FREQUENCY_EMBEDDING_SIZE,
    DismantledBlock,
    PatchEmbed,
    QkvLinear,
    joint_attention,
    timestep_embedding,
)


class LinearSiluLinear(nn.Module):
    """``linear_2(silu(linear_1(x)))`` under the released file's names (diffusers' embedder names)."""

    def __init__(self, dim_in: int, dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim, dtype=dtype, device=device)
        self.linear_2 = nn.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(nn.functional.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    def __init__(self, pooled_dim: int, dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.timestep_embedder = LinearSiluLinear(FREQUENCY_EMBEDDING_SIZE, dim, dtype, device)
        self.text_embedder = LinearSiluLinear(pooled_dim, dim, dtype, device)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        c = self.timestep_embedder(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(dtype))
        return c + self.text_embedder(pooled)


def single_stream(block: DismantledBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One DiT block on the image tokens alone (the joint block's image half, attending only to itself)."""
    h, _, mods = block.attention_inputs(x, c)
    return block.post_attention(joint_attention(((block.attn, h),))[0], None, x, mods)


class ControlNet(nn.Module):
    """``forward(tokens, control_latent, t, pooled)`` -> one hidden state per ControlNet block (unscaled)."""

    IGNORED_FILE_KEYS = (CONTROL_TYPE_KEY, *UNUSED_KEYS)

    @staticmethod
    def file_names(key: str) -> list[str]:
        """The file's tensor that fills parameter ``key``: the released file has our names."""
        return [key]

    def __init__(self, config: ControlNetConfig, qkv_linear: type[nn.Linear] = QkvLinear, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.config = config
        dim, heads = config.hidden_size, config.num_heads
        self.pos_embed_input = PatchEmbed(config.patch_size, config.in_channels, dim, dtype, device)
        self.time_text_embed = TimeTextEmbed(config.pooled_dim, dim, dtype, device)
        self.transformer_blocks = nn.ModuleList(
            DismantledBlock(dim, heads, False, None, False, qkv_linear, dtype, device) for _ in range(config.depth))
        self.controlnet_blocks = nn.ModuleList(
            nn.Linear(dim, dim, dtype=dtype, device=device) for _ in range(config.depth))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    def hidden_states(self, latent: torch.Tensor, *, tokens: torch.Tensor, t: torch.Tensor,
                      pooled: torch.Tensor | None, **_unused: object) -> list[torch.Tensor]:
        """What :class:`~lib_sd3.controlnet.control.ControlStack` calls: the base's embedded ``tokens``, not ``x``."""
        if pooled is None:
            raise ValueError("an SD3.5 ControlNet needs the pooled text vector (y)")
        return self(tokens, latent, t, pooled)

    def forward(self, tokens: torch.Tensor, control_latent: torch.Tensor, t: torch.Tensor,
                pooled: torch.Tensor) -> list[torch.Tensor]:
        """``tokens``: the base's ``x_embedder(x) + cropped_pos_embed`` (B, L, D); ``control_latent``: (B, C, H, W);
        ``t``: the base's timestep (1000 sigma), (B,); ``pooled``: the raw pooled text vector (B, pooled_dim)."""
        c = self.time_text_embed(t, pooled, tokens.dtype)
        x = tokens + self.pos_embed_input(control_latent)
        hidden = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            x = single_stream(block, x, c)
            hidden.append(out(x))
        return hidden
