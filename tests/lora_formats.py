"""Test-side helpers: a tiny diffusers SD3 transformer with peft LoRAs, written out in each published key scheme.

The converters are written here from the formats' own descriptions (diffusers' ``convert_sd3_to_diffusers``
for the Stability <-> diffusers weight layout; kohya-ss ``networks/lora_sd3.py``; OneTrainer's
``lora_transformer_`` names; LyCORIS' ``lycoris_`` names), independently of ``lib_sd3.lora``.
"""

from __future__ import annotations

import torch
from torch import nn

RANK = 4
ALPHA = 8.0  # peft scaling alpha / r = 2: formats that store alpha must carry it, the others fold it into B


def tiny_transformer(seed: int = 0, sd35: bool = False):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    kwargs = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
                  pos_embed_max_size=8)
    if sd35:
        kwargs.update(dual_attention_layers=(0, 1), qk_norm="rms_norm")
    model = SD3Transformer2DModel(**kwargs).eval()
    with torch.no_grad():  # diffusers zero-initialises some output layers; make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def linear_names(model: nn.Module) -> list[str]:
    """The model's own Linear layers (not peft's lora_A / lora_B children)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n
            and not n.endswith(".base_layer")]


def add_peft_lora(model: nn.Module, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Attach a random rank-4 peft LoRA on every Linear; return its peft state dict (diffusers names)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = [n.replace(".base_layer", "") for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".lora_" not in n and (n.endswith(".base_layer") or not hasattr(m, "lora_A"))]
    targets = sorted({n for n in targets if not any(t != n and t.startswith(n + ".") for t in targets)})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config, adapter_name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                module.lora_A[name].weight.normal_(0, 0.2)
                module.lora_B[name].weight.normal_(0, 0.2)
    return {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
                pooled_projections=torch.randn(2, 12, generator=g),
                timestep=torch.tensor([500.0, 20.0]))


# ---- the Stability <-> diffusers layout of the Linear weights (from diffusers' convert_sd3_to_diffusers) ----

def _block_pairs(i: int, pre_only: bool, dual: bool):
    d, s = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
    yield s + "x_block.attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], False
    yield s + "x_block.attn.proj", [d + "attn.to_out.0"], False
    yield s + "x_block.mlp.fc1", [d + "ff.net.0.proj"], False
    yield s + "x_block.mlp.fc2", [d + "ff.net.2"], False
    yield s + "x_block.adaLN_modulation.1", [d + "norm1.linear"], False
    yield s + "context_block.attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], False
    yield s + "context_block.adaLN_modulation.1", [d + "norm1_context.linear"], pre_only  # AdaLayerNormContinuous
    if not pre_only:
        yield s + "context_block.attn.proj", [d + "attn.to_add_out"], False
        yield s + "context_block.mlp.fc1", [d + "ff_context.net.0.proj"], False
        yield s + "context_block.mlp.fc2", [d + "ff_context.net.2"], False
    if dual:
        yield s + "x_block.attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], False
        yield s + "x_block.attn2.proj", [d + "attn2.to_out.0"], False


def layout_pairs(model) -> list[tuple[str, list[str], bool]]:
    """(stability name, diffusers names to concatenate, swap scale/shift halves) for every Linear."""
    cfg = model.config
    pairs = [
        ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"], False),
        ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"], False),
        ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"], False),
        ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"], False),
        ("context_embedder", ["context_embedder"], False),
        ("final_layer.linear", ["proj_out"], False),
        ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True),
    ]
    for i in range(cfg.num_layers):
        pairs += list(_block_pairs(i, i == cfg.num_layers - 1, i in tuple(cfg.dual_attention_layers)))
    return pairs


def _swap(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat((t[h:], t[:h]))


def to_stability(model) -> dict[str, torch.Tensor]:
    """The Linear weights of a diffusers SD3 transformer, in Stability names and fused-qkv layout."""
    sd = model.state_dict()
    out = {}
    for stab, diff, swap in layout_pairs(model):
        w = torch.cat([sd[n + ".weight"] for n in diff])
        out[stab] = (_swap(w) if swap else w).clone()
    return out


def from_stability(model, weights: dict[str, torch.Tensor]) -> None:
    """Write Stability-layout Linear weights back into a diffusers SD3 transformer."""
    sd = {}
    for stab, diff, swap in layout_pairs(model):
        w = _swap(weights[stab]) if swap else weights[stab]
        for n, part in zip(diff, w.chunk(len(diff)), strict=True):
            sd[n + ".weight"] = part
    missing = set(sd) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(sd, strict=False)


# ---- the LoRA file formats ----

def _modules(peft_sd):
    """diffusers module name -> (A, B) of a peft state dict."""
    out = {}
    for key, t in peft_sd.items():
        module, _, part = key.rpartition(".lora_")
        out.setdefault(module, {})[part.split(".")[0]] = t
    return {m: (ab["A"], ab["B"]) for m, ab in out.items()}


def fmt_diffusers(peft_sd):  # diffusers save_lora_weights: "transformer." prefix, no alpha (scale folded)
    scale = ALPHA / RANK
    return {f"transformer.{m}.lora_{x}.weight": (t * scale if x == "B" else t)
            for m, (a, b) in _modules(peft_sd).items() for x, t in (("A", a), ("B", b))}


def fmt_peft(peft_sd):  # PeftModel.save_pretrained: "base_model.model." prefix
    scale = ALPHA / RANK
    return {f"base_model.model.{m}.lora_{x}.weight": (t * scale if x == "B" else t)
            for m, (a, b) in _modules(peft_sd).items() for x, t in (("A", a), ("B", b))}


def _kohya_style(peft_sd, prefix):
    out = {}
    for m, (a, b) in _modules(peft_sd).items():
        name = prefix + m.replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


def fmt_onetrainer(peft_sd):
    return _kohya_style(peft_sd, "lora_transformer_")


def fmt_lycoris_lora(peft_sd):
    return _kohya_style(peft_sd, "lycoris_")


def fmt_lycoris_loha(peft_sd):
    """LoHa whose second Hadamard factor is all ones: (B A) * 1 = the same delta."""
    out = {}
    for m, (a, b) in _modules(peft_sd).items():
        name = "lycoris_" + m.replace(".", "_")
        out[f"{name}.hada_w1_a"], out[f"{name}.hada_w1_b"] = b, a
        out[f"{name}.hada_w2_a"] = torch.ones(b.shape[0], RANK)
        out[f"{name}.hada_w2_b"] = torch.full((RANK, a.shape[1]), 1.0 / RANK)
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


def fmt_lycoris_lokr(peft_sd):
    """LoKr kron([[1]], B A): the same delta."""
    out = {}
    for m, (a, b) in _modules(peft_sd).items():
        name = "lycoris_" + m.replace(".", "_")
        out[f"{name}.lokr_w1"] = torch.ones(1, 1)
        out[f"{name}.lokr_w2_a"], out[f"{name}.lokr_w2_b"] = b, a
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    return out


def fmt_kohya(peft_sd, model):
    """kohya sd-scripts / Stability: LoRA on the fused Stability modules (``lora_unet_joint_blocks_N_...``).

    q/k/v become one rank-3r LoRA on ``qkv`` (kohya's ``split_qkv`` save layout: down stacked, up block-diagonal).
    """
    mods = _modules(peft_sd)
    out = {}
    for stab, diff, swap in layout_pairs(model):
        present = [d for d in diff if d in mods]
        if not present:
            continue
        name = "lora_unet_" + stab.replace(".", "_")
        downs = [mods[d][0] for d in diff]
        ups = [mods[d][1] for d in diff]
        rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(sum(u.shape[0] for u in ups), rank)
        r0 = c0 = 0
        for u in ups:
            up[r0:r0 + u.shape[0], c0:c0 + u.shape[1]] = u
            r0, c0 = r0 + u.shape[0], c0 + u.shape[1]
        out[f"{name}.lora_down.weight"] = torch.cat(downs)
        out[f"{name}.lora_up.weight"] = _swap(up) if swap else up
        out[f"{name}.alpha"] = torch.tensor(ALPHA * len(diff))  # scale alpha/rank stays ALPHA / RANK
    return out


FORMATS = {
    "diffusers": lambda sd, model: fmt_diffusers(sd),
    "peft": lambda sd, model: fmt_peft(sd),
    "kohya": fmt_kohya,
    "onetrainer": lambda sd, model: fmt_onetrainer(sd),
    "lycoris_lora": lambda sd, model: fmt_lycoris_lora(sd),
    "lycoris_loha": lambda sd, model: fmt_lycoris_loha(sd),
    "lycoris_lokr": lambda sd, model: fmt_lycoris_lokr(sd),
}
