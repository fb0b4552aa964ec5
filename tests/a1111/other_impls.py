"""Fakes of A1111's ``modules/models/sd3/other_impls.py``: ``T5XXLModel`` at a reduced size.

Kept: what our code touches, with A1111's names and shapes. ``SD3Cond`` builds
``T5XXLModel(T5_CONFIG, device="cpu", dtype=devices.dtype)`` only when ``opts.sd3_enable_t5`` is on
(tests/a1111/sd3.py, ``T5_CONDS``); the T5 module's ``transformer`` holds T5-XXL's real key layout
(``encoder.block.N.layer.0.SelfAttention.q.weight``, ``...layer.1.DenseReluDense.wi_0.weight``, layer norms,
block 0's relative attention bias) at a reduced size in ``AutocastLinear`` layers (weight cast to the input's
dtype on every call), the embedding is built without a dtype, and the output is ``(z.float(), None)``. The
arithmetic is simpler than T5's.
"""

from __future__ import annotations

import torch

T5_CONFIG = {"d_ff": 24, "d_model": 16, "num_heads": 2, "num_layers": 3, "vocab_size": 50}
TOKENS = 6


class AutocastLinear(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)


class LayerNorm(torch.nn.Module):
    def __init__(self, d, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d, dtype=dtype, device=device))

    def forward(self, x):
        return x * self.weight.to(x.dtype)


class SelfAttention(torch.nn.Module):
    def __init__(self, d, heads, first, dtype, device):
        super().__init__()
        for name in ("q", "k", "v", "o"):
            setattr(self, name, AutocastLinear(d, d, bias=False, dtype=dtype, device=device))
        self.relative_attention_bias = torch.nn.Embedding(32, heads, device=device) if first else None

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)) * torch.tanh(self.k(x)) + self.v(x))


class DenseReluDense(torch.nn.Module):
    def __init__(self, d, ff, dtype, device):
        super().__init__()
        self.wi_0 = AutocastLinear(d, ff, bias=False, dtype=dtype, device=device)
        self.wi_1 = AutocastLinear(d, ff, bias=False, dtype=dtype, device=device)
        self.wo = AutocastLinear(ff, d, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.wo(torch.nn.functional.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class Sublayer(torch.nn.Module):
    def __init__(self, name, inner, d, dtype, device):
        super().__init__()
        setattr(self, name, inner)
        self.inner = name
        self.layer_norm = LayerNorm(d, dtype, device)

    def forward(self, x):
        return x + torch.tanh(getattr(self, self.inner)(self.layer_norm(x)))


class Block(torch.nn.Module):
    def __init__(self, config, first, dtype, device):
        super().__init__()
        d = config["d_model"]
        self.layer = torch.nn.ModuleList([
            Sublayer("SelfAttention", SelfAttention(d, config["num_heads"], first, dtype, device), d, dtype, device),
            Sublayer("DenseReluDense", DenseReluDense(d, config["d_ff"], dtype, device), d, dtype, device)])

    def forward(self, x):
        return self.layer[1](self.layer[0](x))


class T5Stack(torch.nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        d = config["d_model"]
        self.embed_tokens = torch.nn.Embedding(config["vocab_size"], d, device=device)
        self.block = torch.nn.ModuleList([Block(config, i == 0, dtype, device) for i in range(config["num_layers"])])
        self.final_layer_norm = LayerNorm(d, dtype, device)

    def forward(self, ids):
        x = self.embed_tokens(ids).to(torch.float32)
        for block in self.block:
            x = block(x)
        return self.final_layer_norm(x)


class T5(torch.nn.Module):
    def __init__(self, config, dtype, device):
        super().__init__()
        self.encoder = T5Stack(config, dtype, device)


class T5XXLModel(torch.nn.Module):
    def __init__(self, config, device="cpu", layer="last", layer_idx=None, dtype=None):
        super().__init__()
        self.transformer = T5(config, dtype, device)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6055))

    def forward(self, tokens):
        embeds = self.transformer.encoder.embed_tokens
        tokens = torch.asarray(tokens, dtype=torch.int64, device=embeds.weight.device)
        return self.transformer.encoder(tokens).float(), None


def tokenize(texts):
    return [[(ord(c) % 49) + 1 for c in text[:TOKENS]] + [0] * (TOKENS - len(text[:TOKENS])) for text in texts]
