"""Our MMDiT for the whole SD3 family: SD3 Medium, SD3.5 with qk-norm (RMSNorm on q and k per head), MMDiT-X.

Written in the style of sd3-ref / A1111's ``modules/models/sd3/mmdit.py`` with Stability's key
layout (``joint_blocks.N.{context_block,x_block}.attn.qkv``, ``attn.ln_q``, ``x_block.attn2.*``,
``adaLN_modulation.1``), so checkpoints, MixDQ layer names and LoRA names are the ones A1111 and
Stability use. A1111's own MMDiT has qk-norm but is never told to use it and has no MMDiT-X.

The arithmetic is sd3-ref's, operation for operation (so SD3 Medium gives A1111's numbers bit for
bit), except the qk-norm of the SD3.5 families (which A1111 cannot run), whose mean square is taken in
fp32 as diffusers does; otherwise only the memory work differs, because that is where a step loses time
next to diffusers:
the image stream is made contiguous once after the patch embedding (sd3-ref keeps the transposed
view of ``flatten(2).transpose(1, 2)``, so every LayerNorm copied it and every residual add ran on
strided memory), modulation, gating, GELU and the qk-norm scale run in place on tensors this block
just made, and both streams write q/k/v straight into the joint attention's inputs. Blocks run
without autograd history in the WebUI; the in-place steps only ever touch fresh intermediates,
never a block's inputs.

An MMDiT-X block (SD3.5 Medium) gives the image stream a second self-attention over image tokens
only (``attn2``), fed by the same ``norm1`` output with its own shift/scale and added with its own
gate: a 9-way adaLN modulation (shift/scale/gate for msa, mlp, msa2) instead of 6-way.

Blocks are called ``block(context, x, c=...)`` and return ``(context, x)``, like A1111's, so
:func:`lib_sd3.sampling.slg.skip_blocks` and anything else written for A1111's MMDiT works on both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib_sd3.models.families import MMDiTConfig

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features, as sd3-ref
NORM_EPS = 1e-6


class QkvLinear(nn.Linear):
    """The fused q/k/v projection. The WebUI passes A1111's class instead (its LoRA code type-checks it)."""


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def modulate_(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`modulate` in place on ``x`` (a fresh norm output): the same products and sums, no new tensor."""
    return x.mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))


def gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + gate * update``, scaling the fresh ``update`` in place rather than allocating the product."""
    return x + update.mul_(gate.unsqueeze(1))


def tokens_first(out: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B, L, H*D)``."""
    b, heads, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, heads * d)


def joint_attention(streams: Sequence[tuple[SelfAttention, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Attention over the streams' tokens together; each stream's ``(B, L_i, H*D)`` rows of the output.

    ``streams``: each stream's attention module and its modulated input (one stream: plain self-attention,
    as in MMDiT-X's ``attn2`` and the SD3.5 Large ControlNet's blocks). Each writes its q, k and v
    straight into its rows of one contiguous head-major ``(B, H, L, D)`` tensor per q, k and v (the
    qk-norm's last product lands there instead of being copied over by a join). Head-major: the CPU
    attention kernel runs 6-13 % faster on it than on token-major views in fp32 (the same in bf16),
    more than the output's copy back to ``(B, L, H*D)`` costs.
    """
    heads = streams[0][0].num_heads
    lengths = [h.shape[1] for _, h in streams]
    b, _, dim = streams[0][1].shape
    joint = [streams[0][1].new_empty(b, heads, sum(lengths), dim // heads) for _ in range(3)]
    start = 0
    for (attn, h), n in zip(streams, lengths, strict=True):
        attn.project_into(h, [t[:, :, start:start + n].transpose(1, 2) for t in joint])
        start += n
    return tokens_first(F.scaled_dot_product_attention(*joint)).split(lengths, dim=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos, sin]`` of the timestep (sd3-ref's order)."""
    half = dim // 2
    # on the CPU and then moved, as sd3-ref does: exp on another device may round differently
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned scale (the qk-norm of SD3.5)."""

    def __init__(self, dim: int, eps: float = NORM_EPS, dtype=None, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out``: where the result goes (a view into the joint attention's input), else a new tensor.

        The mean square comes from each row's norm taken in (at least) fp32, as diffusers does, without the
        squared copy and its fp32 cast that sd3-ref's ``x.pow(2).mean()`` makes in bf16; the row's scale is
        rounded to ``x``'s dtype once.
        """
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        scale = torch.rsqrt(norm.square() / x.shape[-1] + self.eps).to(x.dtype)
        weight = self.weight.to(device=x.device, dtype=x.dtype)
        if out is not None and not torch.is_grad_enabled():
            return torch.mul(x, scale, out=out).mul_(weight)
        y = x * scale * weight  # out= records no autograd history: with grad on, the product is copied over
        return y if out is None else out.copy_(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype=None, device=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, dtype=dtype, device=device)
        self.fc2 = nn.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_(self.fc1(x)))


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")`` in place: the same kernel, without a second 4x-wide tensor."""
    return torch.ops.aten.gelu_(x, approximate="tanh")


class Embedder(nn.Module):
    """``mlp = Linear, SiLU, Linear`` -- the timestep and pooled-text embedders' shared shape."""

    def __init__(self, dim_in: int, dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim, dtype=dtype, device=device), nn.SiLU(),
                                 nn.Linear(dim, dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool, qk_norm: str | None, qkv_linear: type[nn.Linear],
                 dtype=None, device=None) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = qkv_linear(dim, 3 * dim, bias=True, dtype=dtype, device=device)
        if not pre_only:
            self.proj = nn.Linear(dim, dim, dtype=dtype, device=device)
        if qk_norm == "rms":
            self.ln_q = RMSNorm(dim // heads, dtype=dtype, device=device)
            self.ln_k = RMSNorm(dim // heads, dtype=dtype, device=device)
        elif qk_norm is None:
            self.ln_q = self.ln_k = nn.Identity()
        else:
            raise ValueError(f"unknown qk_norm {qk_norm!r}")

    def project_into(self, x: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
        """q, k (each through its qk-norm) and v of ``x`` written into ``out``: three ``(B, L, H, D)`` views."""
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, dim // self.num_heads).unbind(2)
        for source, norm, target in ((q, self.ln_q, out[0]), (k, self.ln_k, out[1]), (v, None, out[2])):
            if isinstance(norm, RMSNorm):
                norm(source, out=target)
            else:
                target.copy_(source if norm is None else norm(source))


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-modulated attention inputs, then gated attention + MLP."""

    def __init__(self, dim: int, heads: int, pre_only: bool, qk_norm: str | None, dual_attention: bool,
                 qkv_linear: type[nn.Linear], dtype=None, device=None) -> None:
        super().__init__()
        self.pre_only, self.dual_attention = pre_only, dual_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS, dtype=dtype, device=device)
        self.attn = SelfAttention(dim, heads, pre_only, qk_norm, qkv_linear, dtype, device)
        if dual_attention:
            self.attn2 = SelfAttention(dim, heads, False, qk_norm, qkv_linear, dtype, device)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS, dtype=dtype, device=device)
            self.mlp = Mlp(dim, 4 * dim, dtype, device)
        self.n_mods = 2 if pre_only else 9 if dual_attention else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mods * dim, dtype=dtype, device=device))

    def attention_inputs(self, x: torch.Tensor, c: torch.Tensor):
        """``attn``'s modulated input, ``attn2``'s or None, and the modulation chunks (post_attention needs them)."""
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)
        h = self.norm1(x)
        h2 = modulate(h, mods[6], mods[7]) if self.dual_attention else None
        return modulate_(h, mods[0], mods[1]), h2, mods  # modulate_ last: h is its input

    def post_attention(self, attn: torch.Tensor, attn2: torch.Tensor | None, x: torch.Tensor,
                       mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = gated(x, gate_msa, self.attn.proj(attn))
        if attn2 is not None:
            x = gated(x, mods[8], self.attn2.proj(attn2))
        return gated(x, gate_mlp, self.mlp(modulate_(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """Text and image streams attend jointly; the text stream of the last block is ``pre_only``."""

    def __init__(self, dim: int, heads: int, pre_only: bool, qk_norm: str | None, dual_attention: bool,
                 qkv_linear: type[nn.Linear], dtype=None, device=None) -> None:
        super().__init__()
        self.context_block = DismantledBlock(dim, heads, pre_only, qk_norm, False, qkv_linear, dtype, device)
        self.x_block = DismantledBlock(dim, heads, False, qk_norm, dual_attention, qkv_linear, dtype, device)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        context_h, _, context_mods = self.context_block.attention_inputs(context, c)
        x_h, x_h2, x_mods = self.x_block.attention_inputs(x, c)
        context_attn, x_attn = joint_attention(((self.context_block.attn, context_h), (self.x_block.attn, x_h)))
        attn2 = joint_attention(((self.x_block.attn2, x_h2),))[0] if x_h2 is not None else None
        context = None if self.context_block.pre_only else \
            self.context_block.post_attention(context_attn, None, context, context_mods)
        return context, self.x_block.post_attention(x_attn, attn2, x, x_mods)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int, dtype=None, device=None) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: the image stream keeps this layout through every block
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, dtype=None, device=None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS, dtype=dtype, device=device)
        self.linear = nn.Linear(dim, out, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate_(self.norm_final(x), shift, scale))


BlockResiduals = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor, "torch.Tensor | None"],
                          Sequence["torch.Tensor | None"]]
"""``(tokens, t, y, x, context) -> [residual or None per joint block]``: what a ControlNet adds to the image stream
after each joint block, given the patch-embedded input and the raw latent and context (see :mod:`lib_sd3.controlnet`)."""


def crop_pos_embed(pos_embed: torch.Tensor, hw: tuple[int, ...], patch: int, size: int, owner: str) -> torch.Tensor:
    """The centre crop of a ``size x size`` position grid for an ``h x w`` latent (sd3-ref's rule); ``owner`` names
    the grid in the error ("this model's")."""
    h, w = hw[0] // patch, hw[1] // patch
    if h > size or w > size:
        raise ValueError(f"latent {tuple(hw)} is larger than {owner} {size * patch} x {size * patch} position grid")
    top, left = (size - h) // 2, (size - w) // 2
    return pos_embed.reshape(1, size, size, -1)[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)


class MMDiT(nn.Module):
    """``forward(x, t, y, context)`` -> velocity shaped like ``x``; A1111's ``BaseModel`` calls it the same way.

    ``block_residuals`` (optional) is the ControlNet's entry; without it the forward is unchanged.
    """

    def __init__(self, config: MMDiTConfig, qkv_linear: type[nn.Linear] = QkvLinear, dtype=None, device=None) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype  # A1111's BaseModel.get_dtype() reads this attribute
        dim, heads = config.hidden_size, config.num_heads
        self.patch_size, self.out_channels = config.patch_size, config.out_channels
        self.pos_embed_max_size = config.pos_embed_max_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, dim, dtype, device)
        self.t_embedder = Embedder(FREQUENCY_EMBEDDING_SIZE, dim, dtype, device)
        self.y_embedder = Embedder(config.adm_dim, dim, dtype, device)
        self.context_embedder = nn.Linear(config.context_dim, dim, dtype=dtype, device=device)
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size ** 2, dim, dtype=dtype,
                                                      device=device))
        dual = set(config.x_block_self_attn_layers)
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, heads, i == config.depth - 1, config.qk_norm, i in dual, qkv_linear, dtype, device)
            for i in range(config.depth))
        self.final_layer = FinalLayer(dim, config.patch_size ** 2 * config.out_channels, dtype, device)

    def cropped_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        return crop_pos_embed(self.pos_embed, hw, self.patch_size, self.pos_embed_max_size, "this model's")

    def unpatchify(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        h, w = hw[0] // p, hw[1] // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, block_residuals: BlockResiduals | None = None) -> torch.Tensor:
        hw = tuple(x.shape[-2:])
        tokens = self.x_embedder(x) + self.cropped_pos_embed(hw).to(x.dtype)
        c = self.t_embedder(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(x.dtype))
        if y is not None:
            c = c + self.y_embedder(y)
        residuals = block_residuals(tokens, t, y, x, context) if block_residuals is not None else ()
        context = self.context_embedder(context)
        for i, block in enumerate(self.joint_blocks):
            context, tokens = block(context, tokens, c=c)
            if i < len(residuals) and residuals[i] is not None:  # a ControlNet (lib_sd3.controlnet)
                tokens = tokens + residuals[i]
        return self.unpatchify(self.final_layer(tokens, c), hw)
