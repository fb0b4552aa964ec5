"""Oracle: a peft LoRA on a tiny diffusers SD3 transformer, saved in every layout, loaded through lib_sd3.lora
onto the Stability-layout weights, gives the same denoiser output as peft's own LoRA model (fp32, 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from lib_sd3.lora import deltas, keys  # noqa: E402
from tests import lora_formats as lf  # noqa: E402

TOL = 1e-4


def _setup(sd35: bool):
    base = lf.tiny_transformer(0, sd35)
    peft_model = copy.deepcopy(base)
    sd_a = lf.add_peft_lora(peft_model, "a", seed=10)
    sd_b = lf.add_peft_lora(peft_model, "b", seed=11)
    return base, peft_model, sd_a, sd_b


@pytest.fixture(scope="module")
def sd3():
    return _setup(False)


def _peft_output(peft_model, weights: dict[str, float]):
    peft_model.set_adapters(list(weights), list(weights.values()))
    with torch.no_grad():
        return peft_model(**lf.inputs()).sample


def _our_output(base, loras: list[tuple[dict, float]]):
    stability = lf.to_stability(base)
    layout = {"unet": {name: tuple(w.shape) for name, w in stability.items()}}
    for state_dict, strength in loras:
        norm = keys.normalise(state_dict, layout)
        assert not norm.unmatched, keys.unmatched_summary(norm.unmatched)
        deltas.merge(stability, {module: w for (_, module), w in norm.modules.items()}, strength)
    model = copy.deepcopy(base)
    lf.from_stability(model, stability)
    with torch.no_grad():
        return model(**lf.inputs()).sample


def test_layout_round_trip_is_exact(sd3):
    base = sd3[0]
    model = copy.deepcopy(base)
    lf.from_stability(model, lf.to_stability(base))
    for k, v in base.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_lora_changes_the_output(sd3):
    base, peft_model, _, _ = sd3
    with torch.no_grad():
        plain = base(**lf.inputs()).sample
    assert (plain - _peft_output(peft_model, {"a": 1.0})).abs().max() > 0.1


@pytest.mark.parametrize("fmt", sorted(lf.FORMATS))
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_every_format_equals_peft(sd3, fmt, strength):
    base, peft_model, sd_a, _ = sd3
    file = lf.FORMATS[fmt](sd_a, base)
    ours = _our_output(base, [(file, strength)])
    expected = _peft_output(peft_model, {"a": strength})
    assert (ours - expected).abs().max().item() < TOL


def test_two_loras_stacked(sd3):
    base, peft_model, sd_a, sd_b = sd3
    ours = _our_output(base, [(lf.FORMATS["kohya"](sd_a, base), 1.0), (lf.FORMATS["diffusers"](sd_b, base), 0.5)])
    expected = _peft_output(peft_model, {"a": 1.0, "b": 0.5})
    assert (ours - expected).abs().max().item() < TOL


def test_sd35_medium_shaped_every_format():
    try:
        base, peft_model, sd_a, sd_b = _setup(True)
    except TypeError as error:  # a diffusers without MMDiT-X / qk-norm
        pytest.skip(f"this diffusers has no SD3.5 Medium pieces: {error}")
    assert any(".attn2." in n for n in lf.linear_names(base))
    for fmt in sorted(lf.FORMATS):
        ours = _our_output(base, [(lf.FORMATS[fmt](sd_a, base), 0.8)])
        assert (ours - _peft_output(peft_model, {"a": 0.8})).abs().max().item() < TOL, fmt
    ours = _our_output(base, [(lf.FORMATS["onetrainer"](sd_a, base), 1.0), (lf.FORMATS["peft"](sd_b, base), 0.5)])
    assert (ours - _peft_output(peft_model, {"a": 1.0, "b": 0.5})).abs().max().item() < TOL


# --- low-precision LyCORIS files through A1111's merge rule ------------------------------------------------

def _a1111_delta(params: dict) -> torch.Tensor:
    """The delta A1111's network modules build, in the dtype they build it in (its network_lora copies the factors
    into layers of the model's dtype, fp32 here; network_hada / network_lokr / network_full use the tensors given)."""
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    if "lora_up.weight" in params:
        return flat(params["lora_up.weight"]).float() @ flat(params["lora_down.weight"]).float()
    if "hada_w1_a" in params:
        return (params["hada_w1_a"] @ params["hada_w1_b"]) * (params["hada_w2_a"] @ params["hada_w2_b"])
    if "lokr_w2_a" in params or "lokr_w2" in params:
        w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]
        w2 = params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_a"] @ params["lokr_w2_b"]
        return torch.kron(w1, w2)
    return params["diff"]


def _a1111_merge(weight: torch.Tensor, params: dict, strength: float) -> torch.Tensor:
    """A1111's ``network_apply_weights``: ``(weight.to(updown.dtype) + updown).to(weight.dtype)``."""
    updown = _a1111_delta(params).reshape(weight.shape) * deltas.scale(params) * strength
    return (weight.to(updown.dtype) + updown).to(weight.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["lycoris_loha", "lycoris_lokr"])
def test_low_precision_lycoris_merges_like_its_fp32_twin(fmt, dtype):
    """A bf16 / fp16 LoHa or LoKr whose values are exact in that dtype must land where peft's fp32 model is:
    the delta, and above all the base weight, must not be rounded to the file's dtype on the way."""
    base = lf.tiny_transformer(0)
    peft_model = copy.deepcopy(base)
    lf.add_peft_lora(peft_model, "a", seed=10)
    with torch.no_grad():  # values every dtype holds exactly, so the file loses nothing
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(p.to(dtype).float())
    from peft.utils import get_peft_model_state_dict

    sd_a = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name="a").items()}
    file = {k: v.to(dtype) for k, v in lf.FORMATS[fmt](sd_a, base).items()}
    stability = lf.to_stability(base)
    norm = keys.normalise(file, {"unet": {name: tuple(w.shape) for name, w in stability.items()}})
    assert not norm.unmatched, keys.unmatched_summary(norm.unmatched)
    for (_, module), params in norm.modules.items():
        stability[module] = _a1111_merge(stability[module], params, 0.8)
    model = copy.deepcopy(base)
    lf.from_stability(model, stability)
    with torch.no_grad():
        ours = model(**lf.inputs()).sample
    assert (ours - _peft_output(peft_model, {"a": 0.8})).abs().max().item() < TOL
