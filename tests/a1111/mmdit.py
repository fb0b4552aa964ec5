"""Fake of A1111's ``modules/models/sd3/mmdit.py``: a small MMDiT with sd3-ref / A1111's module names (A1111 is not in CI).

Same layer names and data flow as ``modules/models/sd3/mmdit.py`` (two streams, joint attention,
adaLN modulation, a ``pre_only`` text stream in the last block), at toy sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class QkvLinear(nn.Linear):
    """A1111 subclasses Linear for qkv; restore must bring this class back."""


class Attention(nn.Module):
    def __init__(self, dim: int, pre_only: bool) -> None:
        super().__init__()
        self.qkv = QkvLinear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)


class DismantledBlock(nn.Module):
    def __init__(self, dim: int, pre_only: bool) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def pre(self, x, c):
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        h = self.norm1(x) * (1 + mods[1].unsqueeze(1)) + mods[0].unsqueeze(1)
        return self.attn.qkv(h).chunk(3, dim=-1), mods

    def post(self, attn, x, mods):
        _, _, gate, shift2, scale2, gate2 = mods
        x = x + gate.unsqueeze(1) * self.attn.proj(attn)
        return x + gate2.unsqueeze(1) * self.mlp(self.norm2(x) * (1 + scale2.unsqueeze(1)) + shift2.unsqueeze(1))


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool) -> None:
        super().__init__()
        self.heads = heads
        self.context_block = DismantledBlock(dim, pre_only)
        self.x_block = DismantledBlock(dim, False)

    def forward(self, context, x, c):
        (cq, ck, cv), cmods = self.context_block.pre(context, c)
        (xq, xk, xv), xmods = self.x_block.pre(x, c)
        b, n_ctx, dim = context.shape

        def heads(t):
            return t.reshape(b, -1, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = (heads(torch.cat(pair, dim=1)) for pair in ((cq, xq), (ck, xk), (cv, xv)))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, dim)
        context_attn, x_attn = attn[:, :n_ctx], attn[:, n_ctx:]
        context = None if self.context_block.pre_only else self.context_block.post(context_attn, context, cmods)
        return context, self.x_block.post(x_attn, x, xmods)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TinyMMDiT(nn.Module):
    """``forward(x, t, y, context)`` like sd3-ref's MMDiT; returns the velocity, shaped like ``x``."""

    def __init__(self, depth: int = 2, dim: int = 64, heads: int = 2, channels: int = 4, patch: int = 2,
                 adm: int = 32, context_dim: int = 48) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.x_embedder = PatchEmbed(channels, dim, patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Module()
        self.y_embedder.mlp = nn.Sequential(nn.Linear(adm, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.context_embedder = nn.Linear(context_dim, dim)
        self.joint_blocks = nn.ModuleList(JointBlock(dim, heads, i == depth - 1) for i in range(depth))
        self.final_layer = FinalLayer(dim, patch * patch * channels)

    def forward(self, x, t, y, context):
        b, ch, h, w = x.shape
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat((torch.cos(args), torch.sin(args)), dim=1).to(x.dtype))
        c = c + self.y_embedder.mlp(y)
        tokens = self.x_embedder(x)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c)
        out = self.final_layer(tokens, c)
        p = self.patch
        out = out.reshape(b, h // p, w // p, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, ch, h, w)
