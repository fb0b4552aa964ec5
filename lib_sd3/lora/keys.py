"""Normalise any common SD3 / SD3.5 LoRA file onto the model's own module names.

Pure and table-driven: a LoRA state dict plus the model's *layout* (its module names and weight
shapes, per namespace) go in; per target module one weights dict in the names A1111's network
modules read (``lora_up.weight`` / ``lora_down.weight`` / ``alpha``, ``hada_*``, ``lokr_*``,
``diff``) comes out, together with every key that could not be used and why. Nothing is dropped
silently.

Namespaces: ``unet`` (the MMDiT, Stability names such as ``joint_blocks.0.x_block.attn.qkv``),
``te1`` (CLIP-L), ``te2`` (CLIP-G), ``te3`` (T5-XXL), each under its Hugging Face module path
(``text_model.encoder.layers.0.self_attn.q_proj``, ``encoder.block.0.layer.0.SelfAttention.q``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from lib_sd3.lora import names
from lib_sd3.lora.deltas import LORA_DOWN, LORA_UP, assemble

Layout = Mapping[str, Mapping[str, tuple[int, ...]]]  # namespace -> module name -> weight shape
TargetKey = tuple[str, str]  # (namespace, module name)

PARAM_RENAMES: dict[str, str] = {"lora_A.weight": LORA_DOWN, "lora_B.weight": LORA_UP}
PARAMS: tuple[str, ...] = tuple(sorted({
    LORA_DOWN, LORA_UP, "lora_mid.weight", "lora_A.weight", "lora_B.weight", "alpha", "scale", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b",
}, key=len, reverse=True))
"""Parameter names a LoRA / LyCORIS module stores (longest first, so ``lokr_w1_a`` wins over ``lokr_w1``)."""

PREFIXES: tuple[tuple[str, str, str], ...] = (
    # (prefix, namespace, format label); tried in this order, the first one whose rest is a known module wins
    ("base_model.model.transformer.", "unet", "peft"),
    ("base_model.model.", "unet", "peft"),
    ("transformer.", "unet", "diffusers"),
    ("model.diffusion_model.", "unet", "stability"),
    ("diffusion_model.", "unet", "stability"),
    ("lora_unet_", "unet", "kohya"),
    ("lora_transformer_", "unet", "onetrainer"),
    ("lycoris_", "unet", "lycoris"),
    ("text_encoders.clip_l.transformer.", "te1", "stability"),
    ("text_encoders.clip_g.transformer.", "te2", "stability"),
    ("text_encoders.t5xxl.transformer.", "te3", "stability"),
    ("text_encoder_2.", "te2", "diffusers"),
    ("text_encoder_3.", "te3", "diffusers"),
    ("text_encoder.", "te1", "diffusers"),
    ("lora_te1_", "te1", "kohya"),
    ("lora_te2_", "te2", "kohya"),
    ("lora_te3_", "te3", "kohya"),
    ("", "unet", "plain"),
)

UNKNOWN_PARAM = "unknown parameter name"
UNKNOWN_MODULE = "no such layer in this model"


@dataclasses.dataclass
class NormalisedLora:
    """A LoRA file in the model's terms."""

    modules: dict[TargetKey, dict[str, torch.Tensor]]
    unmatched: dict[str, str]  # original key -> why it is not used
    formats: set[str]  # which layouts the keys were in (for the log line and /sd3/status)


@dataclasses.dataclass
class _Piece:
    target: names.Target
    params: dict[str, torch.Tensor]
    keys: list[str]


def _underscored(name: str) -> str:
    return name.replace(".", "_")


class KeyIndex:
    """Every spelling of every LoRA-able module of one model, built once per layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._by_namespace: dict[str, dict[str, names.Target]] = {}
        for namespace, modules in layout.items():
            index: dict[str, names.Target] = {}
            for name in modules:
                index[name] = index[_underscored(name)] = names.Target(name)
            if namespace == "unet":
                for name, target in names.diffusers_names(set(modules)).items():
                    index.setdefault(name, target)
                    index.setdefault(_underscored(name), target)
            self._by_namespace[namespace] = index

    def resolve(self, module_key: str) -> tuple[str, names.Target, str] | None:
        """(namespace, target, format) of a LoRA module key such as ``lora_unet_joint_blocks_0_x_block_attn_qkv``."""
        for prefix, namespace, label in PREFIXES:
            if not module_key.startswith(prefix):
                continue
            target = self._by_namespace.get(namespace, {}).get(module_key[len(prefix):])
            if target is not None:
                return namespace, target, label
        return None


def split_param(key: str) -> tuple[str, str] | None:
    """``"a.b.lora_down.weight"`` -> ``("a.b", "lora_down.weight")``; also one-dot keys like ``"x.alpha"``."""
    for param in PARAMS:
        if key.endswith("." + param):
            return key[: -len(param) - 1], param
    return None


def normalise(state_dict: Mapping[str, torch.Tensor], layout: Layout | KeyIndex) -> NormalisedLora:
    """Map a LoRA state dict onto ``layout``; q/k/v pieces are fused into the MMDiT's ``qkv`` rows."""
    index = layout if isinstance(layout, KeyIndex) else KeyIndex(layout)
    unmatched: dict[str, str] = {}
    formats: set[str] = set()
    pieces: dict[str, _Piece] = {}
    targets: dict[str, TargetKey] = {}
    for key, tensor in state_dict.items():
        split = split_param(key)
        if split is None:
            unmatched[key] = UNKNOWN_PARAM
            continue
        module_key, param = split
        if module_key not in pieces:
            found = index.resolve(module_key)
            if found is None:
                unmatched[key] = UNKNOWN_MODULE
                continue
            namespace, target, label = found
            formats.add(label)
            pieces[module_key] = _Piece(target, {}, [])
            targets[module_key] = (namespace, target.module)
        piece = pieces[module_key]
        piece.params[PARAM_RENAMES.get(param, param)] = tensor
        piece.keys.append(key)

    grouped: dict[TargetKey, list[_Piece]] = {}
    for module_key, piece in pieces.items():
        grouped.setdefault(targets[module_key], []).append(piece)
    modules: dict[TargetKey, dict[str, torch.Tensor]] = {}
    for (namespace, module), group in grouped.items():
        shape = tuple(index.layout[namespace][module])
        weights, problem = assemble([(p.target, p.params) for p in group], shape)
        if weights is None:
            for p in group:
                unmatched.update(dict.fromkeys(p.keys, problem))
        else:
            modules[(namespace, module)] = weights
    return NormalisedLora(modules, unmatched, formats)


def layout_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every Linear / Conv2d-like layer under ``module`` (quantized ones too)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if not name:
            continue
        if isinstance(weight, torch.Tensor) and weight.dim() in (2, 4):
            out[name] = tuple(weight.shape)
        elif weight is None and isinstance(getattr(child, "in_features", None), int):  # a quantized Linear
            out[name] = (child.out_features, child.in_features)
    return out


def unmatched_summary(unmatched: Mapping[str, str], limit: int = 8) -> str:
    """One line for the console: how many keys, why, and the first few of them."""
    if not unmatched:
        return ""
    reasons: dict[str, int] = {}
    for reason in unmatched.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    head = ", ".join(list(unmatched)[:limit])
    more = f" (+{len(unmatched) - limit} more)" if len(unmatched) > limit else ""
    why = "; ".join(f"{n} {r}" for r, n in reasons.items())
    return f"{len(unmatched)} keys not applied ({why}): {head}{more}"
