"""Fakes of A1111's ``modules/models/sd3/`` in each SD3 state, and :func:`install` that builds them.

Where a state keeps what (read from the two checkouts):

- early SD3 branch (34b4443c): ``sd3_model.py`` holds ``SD3Cond`` (no ``get_token_count``) and
  ``SD3Inferencer`` (``encode_first_stage`` but no ``get_first_stage_encoding``);
- dev / v1.10: ``sd3_cond.py`` holds ``SD3Cond`` (with ``get_token_count``: how state detection tells
  them apart) and ``sd3_model.py`` holds ``SD3Inferencer`` (with ``get_first_stage_encoding`` and
  ``fix_dimensions``).

Tests get these through the ``sd3_modules`` fixture (tests/conftest.py): ``sd3_modules("early")``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
from torch import nn

from a1111.other_impls import T5_CONFIG, TOKENS, T5XXLModel, tokenize
from lib_sd3.models.families import detect, shapes_of
from lib_sd3.models.mmdit import MMDiT

STATES = ("early", "dev")
SD3_MODEL = "modules.models.sd3.sd3_model"
SD3_COND = "modules.models.sd3.sd3_cond"
COND_MODULE = {"early": SD3_MODEL, "dev": SD3_COND}
"""State -> the module that holds ``SD3Cond``."""


class EarlySD3Cond:
    """``SD3Cond`` as the early SD3 branch has it (in ``sd3_model.py``): no ``get_token_count``."""

    def forward(self, prompts):
        return prompts


class DevSD3Cond(EarlySD3Cond):
    """``SD3Cond`` as v1.10 / dev has it (in ``sd3_cond.py``): ``get_token_count`` is how state detection tells them apart."""

    def get_token_count(self, text):  # A1111's own count (CLIP only): the SD3 counter must never show it
        return -1

    def get_target_prompt_token_count(self, token_count):
        return -1


class EarlyInferencer:
    """``SD3Inferencer`` as on 34b4443c: encodes, but has no ``get_first_stage_encoding``."""

    def encode_first_stage(self, image):
        return image


class DevInferencer(EarlyInferencer):
    def get_first_stage_encoding(self, x):
        return ("dev's own", x)

    def fix_dimensions(self, width, height):
        return width // 16 * 16, height // 16 * 16


class FakeClipLG:
    """The chunking CLIP-L/G: two 77-token chunks per prompt, pooled vector of 2048."""

    def __init__(self, clip_l, clip_g, tokenizer):
        self.clip_l, self.clip_g = clip_l, clip_g

    def __call__(self, prompts):
        return torch.ones((len(prompts), 154, 4096)), torch.full((len(prompts), 2048), 2.0)


class FakeT5:
    """``other_impls.T5XXLModel``: records the token lists it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, tokens):
        self.calls.append(tokens)
        return torch.full((len(tokens), len(tokens[0]), 4096), 3.0), None


class FakeCond:
    """The early branch's ``SD3Cond`` as its encoder sees it: CLIP-L/G, ``t5xxl`` and the sd3-ref tokenizers."""

    def __init__(self, t5_tokenizer, t5):
        self.clip_l, self.clip_g, self.t5xxl = "clip_l", "clip_g", t5
        self.tokenizer = types.SimpleNamespace(clip_l=types.SimpleNamespace(tokenizer=None),
                                               t5xxl=types.SimpleNamespace(tokenizer=t5_tokenizer))


def make_dev_cond(shared):
    """Dev's ``SD3Cond``: T5 built only when ``opts.sd3_enable_t5`` is on, and an ``Sd3T5`` wrapper that returns zeros
    without it."""
    class Sd3T5(torch.nn.Module):
        def __init__(self, t5xxl):
            super().__init__()
            self.t5xxl = t5xxl

        def forward(self, texts, *, token_count):
            if not self.t5xxl or not shared.opts.sd3_enable_t5:
                return torch.zeros((len(texts), token_count, T5_CONFIG["d_model"]))
            return self.t5xxl(tokenize(texts))[0]

    class SD3Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_l = torch.nn.Linear(2, 2)
            self.t5xxl = T5XXLModel(T5_CONFIG, device="cpu", dtype=torch.float32) if shared.opts.sd3_enable_t5 else None
            self.model_t5 = Sd3T5(self.t5xxl)

        def forward(self, prompts):
            return self.model_t5(prompts, token_count=TOKENS)

        def get_token_count(self, text):
            return len(text)

    return SD3Cond


def make_early_cond(shared):
    """The early branch's ``SD3Cond``: T5 built only when ``opts.sd3_enable_t5`` is on, zeros without it."""
    class SD3Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_l = torch.nn.Linear(2, 2)
            self.t5xxl = T5XXLModel(T5_CONFIG, device="cpu", dtype=torch.float32) if shared.opts.sd3_enable_t5 else None

        def forward(self, prompts):
            if self.t5xxl and shared.opts.sd3_enable_t5:
                return self.t5xxl(tokenize(prompts))[0]
            return torch.zeros((len(prompts), TOKENS, T5_CONFIG["d_model"]))

    return SD3Cond


T5_CONDS = {"early": make_early_cond, "dev": make_dev_cond}
"""State -> ``(shared) -> SD3Cond class`` that builds the fake T5 as that state does."""

class ToyBlock(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, context, x, c=None):
        return context * (1 - self.gain), x * (1 + self.gain) + self.gain * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


class ToyMMDiT(nn.Module):
    """An MMDiT reduced to what skip-layer guidance touches: ``joint_blocks``, each ``(context, x, c) -> (context, x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.joint_blocks = nn.ModuleList([ToyBlock(0.3), ToyBlock(-0.2), ToyBlock(0.5)])

    def forward(self, x, sigma, context, y):
        for block in self.joint_blocks:
            context, x = block(context, x, c=y)
        return x * (1 - sigma.view(-1, 1, 1, 1)) + y.view(-1, 1, 1, 1)

CONDS = {"early": EarlySD3Cond, "dev": DevSD3Cond}
INFERENCERS = {"early": EarlyInferencer, "dev": DevInferencer}


def install(webui: Any, state: str, cond: type | None = None, inferencer: type | None = None,
            **cond_module_attrs: Any) -> types.ModuleType:
    """Put ``state``'s SD3 modules into the fake ``modules`` package; returns the module holding ``SD3Cond``.

    ``cond`` / ``inferencer`` replace the state's default classes (a test that needs more of them);
    ``cond_module_attrs`` go beside ``SD3Cond`` (``T5_CONFIG``, ...).
    """
    if state not in STATES:
        raise ValueError(f"state {state!r}: one of {STATES}")
    webui.module(SD3_MODEL, SD3Inferencer=inferencer or INFERENCERS[state])
    return webui.module(COND_MODULE[state], SD3Cond=cond or CONDS[state], **cond_module_attrs)


# --- construction: what A1111 builds from a checkpoint (both states) ----------------------------

class A1111QkvLinear(torch.nn.Linear):
    pass


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, shift=1.0):
        super().__init__()
        self.shift = shift


class A1111MMDiT(MMDiT):
    """Stands in for A1111's own MMDiT class (its arithmetic is ours; the class tells who built it)."""


class A1111BaseModel(torch.nn.Module):
    """What A1111 builds: every family as SD3 Medium."""

    def __init__(self, shift=1.0, device=None, dtype=torch.float32, state_dict=None, prefix=""):
        super().__init__()
        config = dataclasses.replace(detect(shapes_of(state_dict)).config, qk_norm=None, x_block_self_attn_layers=())
        self.diffusion_model = A1111MMDiT(config, qkv_linear=A1111QkvLinear, dtype=dtype, device=device)
        self.model_sampling = ModelSamplingDiscreteFlow(shift=shift)


class Inferencer(torch.nn.Module):
    """``SD3Inferencer`` as far as loading goes: builds ``sd3_model.BaseModel`` from the checkpoint's state dict."""

    def __init__(self, state_dict):
        super().__init__()
        import modules.models.sd3.sd3_model as sd3_model

        self.model = sd3_model.BaseModel(shift=3.0, device="cpu", state_dict=state_dict, prefix="model.diffusion_model.")
        self.is_sd3 = True


def install_construction(webui: Any) -> None:
    """A1111's SD3 construction modules: ``mmdit.QkvLinear``, ``sd3_impls.BaseModel`` (imported into ``sd3_model``)."""
    webui.module("modules.models.sd3.mmdit", QkvLinear=A1111QkvLinear)
    webui.module("modules.models.sd3.sd3_impls", BaseModel=A1111BaseModel,
                 ModelSamplingDiscreteFlow=ModelSamplingDiscreteFlow)
    webui.module(SD3_MODEL, BaseModel=A1111BaseModel)
