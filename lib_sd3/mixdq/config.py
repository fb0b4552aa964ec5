"""MixDQ bit configs: which layer gets how many bits, in MixDQ's YAML shape.

MixDQ keeps one ``layer_name: bits`` map for weights, one for activations, and an "act protect"
list of layers whose activations stay in FP16. We keep the same three pieces in one file::

    name: w8a8
    act_mode: dynamic        # dynamic = per-token int8, static = per-tensor (needs act_scales)
    group_size: 64           # input channels per int4 scale
    bos_aware: true          # CLIP's BOS position of the text stream bypasses activation quantization
    weight: {joint_blocks.0.x_block.attn.qkv: 8, ...}     # 4 or 8; a layer not listed stays float
    act: {joint_blocks.0.x_block.attn.qkv: 8, ...}        # 8; a layer not listed keeps float activations
    act_protect: [final_layer.linear]
    act_scales: {}           # layer: calibrated per-tensor scale, for act_mode static
    weight_format: int       # int (int8 / int4 codes) or fp8 (e4m3 weights and activations, 8 bits only)

Layer names are sd3-ref / A1111 names or the model's own module names (see layers.py), or
patterns with ``*`` (``joint_blocks.*.*_block.attn.qkv``). A plain name the model lacks is an
error that lists every such name -- the silent alternative is a model that is half quantized,
and MixDQ's own message (``Not all keys in weight yaml map to a module``) did not say which keys.
A pattern may match nothing (``attn2`` exists only in SD3.5 Medium), but a config that matches
no layer at all is an error. A plain name beats a pattern; among patterns the first listed wins.

The shipped configs are patterns, one file per bit mix for every SD3 family (SD3 Medium, SD3.5
Large / Large Turbo, SD3.5 Medium): the families differ only in depth, width and MMDiT-X's
``attn2``, which the same rule covers, so per-family files would be three copies of one rule.
Qk-norm weights (``ln_q`` / ``ln_k``) are RMSNorm, not Linear: no config can touch them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lib_sd3.hashing import sha256_bytes
from lib_sd3.mixdq import layers
from lib_sd3.mixdq.qlinear import ACT_BITS, WEIGHT_BITS
from lib_sd3.mixdq.quantizers import DEFAULT_GROUP_SIZE

CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED = ("w8a8", "w4a8", "fp8")
WEIGHT_FORMATS = ("int", "fp8")
MAX_LISTED = 30  # unknown names shown in one error message


class ConfigError(ValueError):
    """A bit config that cannot be applied; the message says exactly what is wrong."""


@dataclasses.dataclass(frozen=True)
class BitConfig:
    weight: dict[str, int]
    act: dict[str, int] = dataclasses.field(default_factory=dict)
    act_protect: tuple[str, ...] = ()
    act_mode: str = "dynamic"
    group_size: int = DEFAULT_GROUP_SIZE
    bos_aware: bool = True
    act_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    name: str = "custom"
    weight_format: str = "int"

    def __post_init__(self) -> None:
        problems = []
        problems += [f"weight bits {b} for {n} (allowed: {list(WEIGHT_BITS)} or 16)"
                     for n, b in self.weight.items() if b not in (*WEIGHT_BITS, 16)]
        problems += [f"activation bits {b} for {n} (allowed: {list(ACT_BITS)})"
                     for n, b in self.act.items() if b not in ACT_BITS]
        problems += [f"act bits 8 for {n}, whose weight stays float: the int8 GEMM needs int8 weights"
                     for n, b in self.act.items() if b == 8 and self.weight.get(n, 16) == 16]
        if self.weight_format not in WEIGHT_FORMATS:
            problems.append(f"weight_format {self.weight_format!r} (allowed: {', '.join(WEIGHT_FORMATS)})")
        elif self.weight_format == "fp8":
            problems += [f"weight bits {b} for {n}: fp8 is 8 bits (e4m3)" for n, b in self.weight.items() if b == 4]
            if self.act_mode != "dynamic":
                problems.append("weight_format fp8 needs act_mode dynamic (per-token fp8 scales)")
        if self.act_mode not in ("dynamic", "static"):
            problems.append(f"act_mode {self.act_mode!r} (allowed: dynamic, static)")
        if self.act_mode == "static":
            problems += [f"act_mode static but no act_scales entry for {n}" for n in self.int8_act_layers()
                         if not self.act_scales.get(n, 0) > 0]
        if problems:
            raise ConfigError(f"bad MixDQ config {self.name!r}:\n  " + "\n  ".join(problems[:MAX_LISTED]))

    def int8_act_layers(self) -> list[str]:
        protect = set(self.act_protect)
        return [n for n, b in self.act.items() if b == 8 and n not in protect]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "act_mode": self.act_mode, "group_size": self.group_size,
                "bos_aware": self.bos_aware, "weight": dict(self.weight), "act": dict(self.act),
                "act_protect": list(self.act_protect), "act_scales": dict(self.act_scales),
                **({"weight_format": self.weight_format} if self.weight_format != "int" else {})}

    def digest(self) -> str:
        """Stable short hash of everything that changes the quantized weights or outputs."""
        return sha256_bytes(json.dumps(self.to_dict(), sort_keys=True).encode())[:12]

    def summary(self) -> str:
        """One line for the infotext: name, hash, and the bit mix."""
        counts: dict[int, int] = {}
        for bits in self.weight.values():
            counts[bits] = counts.get(bits, 0) + 1
        kind = "F" if self.weight_format == "fp8" else "W"
        mix = "/".join(f"{kind}{b}x{counts[b]}" for b in sorted(counts))
        return f"{self.name} ({self.digest()}; {mix}; A8 {self.act_mode} x{len(self.int8_act_layers())})"


def from_dict(data: Any, name: str = "custom") -> BitConfig:
    if not isinstance(data, dict) or "weight" not in data:
        raise ConfigError(f"MixDQ config {name!r} must be a mapping with a 'weight:' section (layer_name: bits)")
    known = {f.name for f in dataclasses.fields(BitConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"MixDQ config {name!r} has unknown keys {unknown}; known: {sorted(known)}")
    data = dict(data)
    for key in ("weight", "act", "act_scales"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"MixDQ config {name!r}: '{key}' must be a mapping layer_name: value")
    data.setdefault("name", name)
    data["weight_format"] = str(data.get("weight_format") or "int")
    data["weight"] = {str(k): int(v) for k, v in (data.get("weight") or {}).items()}
    data["act"] = {str(k): int(v) for k, v in (data.get("act") or {}).items()}
    data["act_scales"] = {str(k): float(v) for k, v in (data.get("act_scales") or {}).items()}
    data["act_protect"] = tuple(str(k) for k in (data.get("act_protect") or ()))
    return BitConfig(**data)


def load(source: str | Path) -> BitConfig:
    """A shipped config by name (``w8a8``, ``w4a8``) or a YAML file path."""
    path = CONFIG_DIR / f"{source}.yaml" if str(source) in SHIPPED else Path(source)
    if not path.is_file():
        raise ConfigError(f"MixDQ config {str(source)!r} not found: give one of {list(SHIPPED)} or a YAML file path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"MixDQ config {path} is not valid YAML: {error}") from None
    return from_dict(data, name=path.stem)


def save(config: BitConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one module of the model becomes."""

    w_bits: int
    act_mode: str  # dynamic | static | float
    act_scale: float | None
    float_rows: int  # leading text positions kept out of activation quantization


def _natural(name: str) -> list:
    """Sort key putting ``joint_blocks.2`` before ``joint_blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class _Matcher:
    """Which config key decides for a module: its plain name, else the first pattern that matches."""

    def __init__(self, keys) -> None:
        self.keys = list(keys)
        self.patterns = [(key, layers.pattern(key)) for key in self.keys]

    def __call__(self, module_name: str, canonical: str) -> str | None:
        for name in (module_name, canonical):
            if name in self.keys:
                return name
        for key, compiled in self.patterns:
            if compiled is not None and (compiled.match(canonical) or compiled.match(module_name)):
                return key
        return None


def resolve(config: BitConfig, model: nn.Module) -> dict[str, LayerPlan]:
    """Map every config entry onto the model's Linear modules; unknown names are one clear error.

    Layers already quantized count as present, so a switch of configs can be checked before the
    current one is undone.
    """
    modules = dict(layers.linear_layers(model, include_quantized=True))
    canonical = {name: layers.canonical_name(name) for name in modules}
    present = set(modules) | set(canonical.values())
    named = set(config.weight) | set(config.act) | set(config.act_protect) | set(config.act_scales)
    missing = sorted((k for k in named if layers.pattern(k) is None and k not in present), key=_natural)
    if missing:
        listed = "\n  ".join(missing[:MAX_LISTED]) + (f"\n  ... and {len(missing) - MAX_LISTED} more"
                                                      if len(missing) > MAX_LISTED else "")
        raise ConfigError(
            f"MixDQ config {config.name!r} names {len(missing)} layer(s) this {layers.naming(model)} model "
            f"does not have (or that are not Linear layers):\n  {listed}\n"
            "Use sd3-ref/A1111 names (joint_blocks.N.x_block.attn.qkv), the model's own module names or "
            "patterns (joint_blocks.*.x_block.attn.qkv); a config made for another model or depth does not fit."
        )
    weight_key, act_key = _Matcher(config.weight), _Matcher(config.act)
    protect_key, scale_key = _Matcher(config.act_protect), _Matcher(config.act_scales)
    int8_act = set(config.int8_act_layers())
    plan: dict[str, LayerPlan] = {}
    for module_name in sorted(modules, key=_natural):
        name = canonical[module_name]
        key = weight_key(module_name, name)
        if key is None:
            continue
        bits = config.weight[key]
        if bits == 16:
            continue
        act = act_key(module_name, name)
        quantized_act = act in int8_act and protect_key(module_name, name) is None
        mode = config.act_mode if quantized_act else "float"
        rows = 1 if config.bos_aware and layers.is_text_stream(name) else 0
        plan[module_name] = LayerPlan(bits, mode, config.act_scales.get(scale_key(module_name, name) or ""), rows)
    if config.weight and not plan and any(b != 16 for b in config.weight.values()):
        raise ConfigError(f"MixDQ config {config.name!r} matches no Linear layer of this {layers.naming(model)} model")
    misfit = sorted(f"{m} (in_features {modules[m].in_features})" for m, p in plan.items()
                    if p.w_bits == 4 and modules[m].in_features % config.group_size)
    if misfit:
        raise ConfigError(f"MixDQ config {config.name!r}: int4 needs in_features divisible by group_size "
                          f"{config.group_size}; these layers are not:\n  " + "\n  ".join(misfit[:MAX_LISTED]))
    return plan
