"""MixDQ calibration: measure each layer's sensitivity, then solve the bit allocation exactly.

1. **Sensitivity, metric-decoupled.** Each candidate layer is quantized *alone* at each weight
   width (4, 8), the model is run on the calibration samples, and its output is compared with
   the float model's. Layers are judged by what they control (:func:`layers.role`):
   *content* layers (text stream, image attention) by structure, ``1 - SSIM`` of the predicted
   clean latent; *quality* layers by the noise-to-signal power ratio ``10^(-SQNR/10)`` of the
   same. Each group's losses are divided by the group's worst loss, so the two metrics are on one
   scale, and ``content_weight`` (MixDQ's K) trades them off.
2. **Activation protect list.** Token-wise layers are also measured at W8A8 vs W8; the worst
   ``protect_fraction`` of them keep float activations (MixDQ's "act protect").
3. **Integer programme.** Binary ``x[l, b]`` (layer l stored at b bits, b in {4, 8, 16}):

       minimise   sum_l,b loss[l, b] x[l, b]
       subject to sum_b x[l, b] = 1                       (one width per layer)
                  fixed + sum_l,b bytes[l, b] x[l, b] <= budget

   ``bytes`` is :func:`qlinear.layer_bytes`, i.e. exactly what :class:`QuantLinear` allocates,
   so the quantized model's size is at most the budget. Solved with scipy's ``milp`` (HiGHS).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib_sd3 import get_logger
from lib_sd3.mixdq import layers
from lib_sd3.mixdq.config import BitConfig
from lib_sd3.mixdq.model import module_bytes, swap_module
from lib_sd3.mixdq.qlinear import QuantLinear, layer_bytes
from lib_sd3.mixdq.quantizers import DEFAULT_GROUP_SIZE, INT8_QMAX

log = get_logger("mixdq.calibrate")

PROMPTS_FILE = Path(__file__).parent / "prompts.txt"
CANDIDATE_BITS = (4, 8, 16)
SSIM_WINDOW = 7  # latent pixels
SSIM_C1, SSIM_C2 = 1e-4, 9e-4  # (0.01 L)^2, (0.03 L)^2 for a dynamic range L = 1

Forward = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def read_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    """One prompt per non-blank line (default: the shipped calibration prompts)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def nsr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Noise-to-signal power ratio ``|out - ref|^2 / |ref|^2`` = 10^(-SQNR/10)."""
    ref64, out64 = ref.double(), out.double()
    return float((out64 - ref64).pow(2).sum() / ref64.pow(2).sum().clamp_min(1e-30))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two ``(B, C, H, W)`` latents, uniform window, each channel scaled to [0, 1] by ``a``."""
    a64, b64 = a.double(), b.double()
    lo = a64.amin(dim=(2, 3), keepdim=True)
    span = (a64.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-12)
    a64, b64 = (a64 - lo) / span, (b64 - lo) / span
    window = min(SSIM_WINDOW, a.shape[2], a.shape[3])

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mu_a, mu_b = mean(a64), mean(b64)
    var_a = mean(a64 * a64) - mu_a**2
    var_b = mean(b64 * b64) - mu_b**2
    cov = mean(a64 * b64) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2))
    return float(value.mean())


def loss(role: str, ref: torch.Tensor, out: torch.Tensor) -> float:
    return 1.0 - ssim(ref, out) if role == "content" else nsr(ref, out)


@dataclasses.dataclass
class Sensitivity:
    weight: dict[str, dict[int, float]]  # layer -> bits -> raw loss (16 -> 0)
    act: dict[str, float]  # token-wise layer -> extra loss of int8 activations on top of W8
    roles: dict[str, str]


def _run(model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], forward: Forward) -> list[torch.Tensor]:
    with torch.no_grad():
        return [forward(model, s) for s in samples]


def _measure(model, modules, samples, forward, refs, role, w_bits, act_mode, group_size) -> float:
    """Loss with one unit (a layer, or diffusers' split q/k/v of one sd3 qkv) quantized alone."""
    originals = {}
    for name in modules:
        rows = 1 if layers.is_text_stream(name) else 0
        quant = QuantLinear.from_linear(model.get_submodule(name), w_bits, act_mode, group_size, float_rows=rows)
        originals[name] = swap_module(model, name, quant)
    try:
        outs = _run(model, samples, forward)
    finally:
        for name, linear in originals.items():
            swap_module(model, name, linear)
    return sum(loss(role, r, o) for r, o in zip(refs, outs, strict=True)) / len(refs)


def measure_sensitivity(model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], forward: Forward,
                        units: dict[str, list[str]], group_size: int = DEFAULT_GROUP_SIZE) -> Sensitivity:
    """Quantize one unit at a time (weights at 4 and 8 bits, then W8A8) and record the loss."""
    refs = _run(model, samples, forward)
    weight, act, roles = {}, {}, {}
    for i, (unit, modules) in enumerate(units.items()):
        role = roles[unit] = layers.role(unit)
        fits4 = all(model.get_submodule(n).in_features % group_size == 0 for n in modules)

        def measure(w_bits: int, act_mode: str, modules=modules, role=role) -> float:
            return _measure(model, modules, samples, forward, refs, role, w_bits, act_mode, group_size)

        weight[unit] = {16: 0.0, 8: measure(8, "float"), 4: measure(4, "float") if fits4 else math.inf}
        if layers.is_tokenwise(unit):
            act[unit] = max(0.0, measure(8, "dynamic") - weight[unit][8])
        log.debug("sensitivity %d/%d %s: %s", i + 1, len(units), unit, weight[unit])
    return Sensitivity(weight, act, roles)


def normalised_costs(sens: Sensitivity, content_weight: float = 1.0) -> dict[str, dict[int, float]]:
    """Per-group normalisation (each group's worst finite loss -> 1), content scaled by ``content_weight``."""
    worst: dict[str, float] = {}
    for name, by_bits in sens.weight.items():
        finite = [v for v in by_bits.values() if math.isfinite(v)]
        worst[sens.roles[name]] = max(worst.get(sens.roles[name], 0.0), *finite)
    costs = {}
    for name, by_bits in sens.weight.items():
        role = sens.roles[name]
        scale = (content_weight if role == "content" else 1.0) / (worst[role] or 1.0)
        costs[name] = {b: v * scale for b, v in by_bits.items()}
    return costs


class BudgetError(ValueError):
    """No allocation fits the memory budget."""


def allocate(costs: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int) -> dict[str, int]:
    """Solve the integer programme above; ``budget`` is for the candidate layers' bytes alone."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    options = [(name, bits) for name in costs for bits in sorted(costs[name]) if math.isfinite(costs[name][bits])]
    if not options:
        raise BudgetError("no quantizable layers to allocate")
    smallest = sum(min(sizes[n][b] for n2, b in options if n2 == n) for n in costs)
    if smallest > budget:
        raise BudgetError(f"memory budget {budget} bytes for the quantizable layers is below the smallest "
                          f"possible size {smallest} bytes (every layer at its lowest width)")
    names = list(costs)
    one_each = np.zeros((len(names), len(options)))
    for j, (name, _) in enumerate(options):
        one_each[names.index(name), j] = 1
    memory = np.array([[sizes[n][b] for n, b in options]], dtype=np.float64)
    result = milp(
        c=np.array([costs[n][b] for n, b in options]),
        integrality=np.ones(len(options)),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(memory, -np.inf, budget)],
    )
    if not result.success:
        raise BudgetError(f"integer programme failed: {result.message}")
    chosen = {options[j][0]: options[j][1] for j in np.flatnonzero(result.x > 0.5)}
    total = sum(sizes[n][b] for n, b in chosen.items())
    if total > budget:  # HiGHS works in floating point; never hand back an allocation over budget
        raise BudgetError(f"solver returned {total} bytes for a budget of {budget}")
    return chosen


def candidate_units(model: nn.Module) -> dict[str, list[str]]:
    """sd3-ref layer name -> the model's Linear modules for it, for every Linear except the embedders
    and the final layer (1 % of the weights, kept float). One entry per sd3-ref name makes the config
    portable: calibrated on diffusers' model (q/k/v split) it applies to A1111's fused qkv too."""
    units: dict[str, list[str]] = {}
    for name, _ in layers.linear_layers(model):
        canonical = layers.canonical_name(name)
        if not layers.PROTECTED.match(canonical):
            units.setdefault(canonical, []).append(name)
    return units


def static_act_scales(model: nn.Module, samples, forward: Forward, units: dict[str, list[str]]) -> dict[str, float]:
    """Per-tensor int8 scales ``amax / 127`` of each unit's input over the samples (BOS rows excluded)."""
    amax: dict[str, float] = dict.fromkeys(units, 0.0)
    handles = []
    for unit, modules in units.items():
        skip = 1 if layers.is_text_stream(unit) else 0

        def hook(_module, args, unit=unit, skip=skip):
            x = args[0]
            if skip and x.dim() == 3 and x.shape[1] > skip:
                x = x[:, skip:]
            amax[unit] = max(amax[unit], float(x.detach().abs().amax()))

        handles += [model.get_submodule(n).register_forward_pre_hook(hook) for n in modules]
    try:
        _run(model, samples, forward)
    finally:
        for handle in handles:
            handle.remove()
    return {n: max(v, 1e-8) / INT8_QMAX for n, v in amax.items()}


def calibrate(model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], forward: Forward, budget_bytes: int,
              content_weight: float = 1.0, protect_fraction: float = 0.02, act_mode: str = "dynamic",
              group_size: int = DEFAULT_GROUP_SIZE, name: str = "calibrated") -> tuple[BitConfig, dict]:
    """Measure, solve, and return the config plus a report (sizes, objective, per-layer losses)."""
    units = candidate_units(model)
    candidates = list(units)
    sens = measure_sensitivity(model, samples, forward, units, group_size)
    modules = dict(layers.linear_layers(model))

    def unit_bytes(unit: str, bits: int) -> int:
        return sum(layer_bytes(modules[n].out_features, modules[n].in_features, bits, modules[n].bias is not None,
                               modules[n].weight.dtype, group_size,
                               static_act=act_mode == "static" and bits < 16 and layers.is_tokenwise(n))
                   for n in units[unit])

    sizes = {u: {b: unit_bytes(u, b) for b in CANDIDATE_BITS if math.isfinite(sens.weight[u][b])} for u in candidates}
    fixed = module_bytes(model) - sum(sizes[n][16] for n in candidates)
    chosen = allocate(normalised_costs(sens, content_weight), sizes, budget_bytes - fixed)
    tokenwise = [n for n in candidates if chosen[n] < 16 and n in sens.act]
    n_protect = round(protect_fraction * len(tokenwise))
    protect = sorted(tokenwise, key=lambda n: sens.act[n], reverse=True)[:n_protect]
    scales = static_act_scales(model, samples, forward, {u: units[u] for u in tokenwise}) if act_mode == "static" else {}
    config = BitConfig(weight={n: b for n, b in chosen.items() if b < 16}, act=dict.fromkeys(tokenwise, 8),
                       act_protect=tuple(protect), act_mode=act_mode, group_size=group_size,
                       act_scales={n: s for n, s in scales.items() if n not in protect}, name=name)
    report = {"budget_bytes": budget_bytes, "predicted_bytes": fixed + sum(sizes[n][b] for n, b in chosen.items()),
              "fixed_bytes": fixed, "layers": len(candidates),
              "bits": {b: sum(1 for v in chosen.values() if v == b) for b in CANDIDATE_BITS},
              "sensitivity": {n: {str(b): v for b, v in sens.weight[n].items()} for n in candidates},
              "act_sensitivity": sens.act}
    return config, report


def denoised_forward(model: nn.Module) -> Forward:
    """Run one sample through the transformer and return its clean-latent estimate ``x - s v``.

    Samples hold ``x`` (noisy latent), ``sigma`` (flow level s), ``timestep`` (1000 s), ``context``
    (the text sequence, CLIP BOS first) and ``pooled``; the call matches the model's naming.
    """
    if layers.naming(model) == "diffusers":
        def run(m: nn.Module, s: dict[str, torch.Tensor]) -> torch.Tensor:
            v = m(hidden_states=s["x"], timestep=s["timestep"], encoder_hidden_states=s["context"],
                  pooled_projections=s["pooled"], return_dict=False)[0]
            return s["x"] - s["sigma"] * v
    else:
        def run(m: nn.Module, s: dict[str, torch.Tensor]) -> torch.Tensor:
            v = m(s["x"], s["timestep"], y=s["pooled"], context=s["context"])
            return s["x"] - s["sigma"] * v
    return run
