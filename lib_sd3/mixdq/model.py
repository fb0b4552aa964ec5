"""Quantize a loaded transformer in place, and put the very same float layers back.

:func:`quantize` swaps each configured ``nn.Linear`` for a :class:`QuantLinear` and keeps the
original module object (so hooks, attributes and classes like A1111's ``QkvLinear`` come back
as they were). To actually free memory the originals' tensors leave the model's device: to CPU
RAM when the model is on an accelerator, or -- when the model already lives in RAM -- to a
safetensors file on disk, read back on :func:`restore`. Both moves are exact copies, so restore
is bit-identical.

Quantized tensors are cached on disk (safetensors, keyed by model hash + config digest, which
includes the weight format: int8 / int4 codes or fp8), so turning MixDQ on a second time loads
codes instead of recomputing them; the kernel path is chosen afresh per device on the loaded codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lib_sd3 import get_logger
from lib_sd3.mixdq import layers
from lib_sd3.mixdq.config import BitConfig, LayerPlan, resolve
from lib_sd3.mixdq.qlinear import QuantLinear
from lib_sd3.mixdq.selection import SELECTOR, KernelChoice
from lib_sd3.safetensors_file import SafetensorsReader, load_tensors

log = get_logger("mixdq")

STATE_ATTR = "_sd3_mixdq_state"
FINGERPRINT_SAMPLES = 4096  # weight values sampled per layer for a model fingerprint
CACHE_FORMAT = "nk2"
"""Layout of the cached tensors, part of the cache file name: bump it whenever QuantLinear's
buffers change meaning. "nk2": weights ``(N, K)`` / packed ``(N, K/2)``, int4 ratios ``(N, K/G)``
(format 1 stored them transposed; its square layers would pass a shape check and be misread)."""


def module_bytes(model: nn.Module) -> int:
    """Bytes held by the model's own parameters and buffers (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def fingerprint(model: nn.Module) -> str:
    """A cheap model identity for the cache when no checkpoint hash is known.

    Hashing all of SD3's 4 GB takes longer than quantizing it, so this hashes every Linear's
    name, shape and dtype plus an evenly strided sample of its values: any fine-tune or merge
    changes the samples, a different architecture changes the names.
    """
    digest = hashlib.sha256()
    for name, module in layers.linear_layers(model):
        weight = module.weight.detach().flatten()
        step = max(1, weight.numel() // FINGERPRINT_SAMPLES)
        digest.update(f"{name}:{tuple(module.weight.shape)}:{module.weight.dtype}".encode())
        digest.update(weight[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class MixDQState:
    """What :func:`quantize` changed, enough for :func:`restore` to undo it exactly."""

    config: BitConfig
    originals: dict[str, nn.Module]
    devices: dict[str, torch.device]  # where each original tensor lived
    spill_path: Path | None
    bytes_before: int
    bytes_after: int
    cache_hit: bool
    seconds: float
    kernel: KernelChoice

    def report(self) -> dict[str, object]:
        return {"config_summary": self.config.summary(), "layers": len(self.originals),
                "memory_before_mb": round(self.bytes_before / 2**20, 1),
                "memory_after_mb": round(self.bytes_after / 2**20, 1),
                "memory_ratio": round(self.bytes_after / self.bytes_before, 4) if self.bytes_before else None,
                "cache_hit": self.cache_hit, "seconds": round(self.seconds, 2), **self.kernel.report()}


def state(model: nn.Module) -> MixDQState | None:
    return getattr(model, STATE_ATTR, None)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def _empty_quant(linear: nn.Module, plan: LayerPlan, config: BitConfig) -> QuantLinear:
    layer = QuantLinear(linear.in_features, linear.out_features, plan.w_bits, plan.act_mode,
                        linear.bias is not None, linear.weight.dtype, linear.weight.device,
                        config.group_size, plan.float_rows, config.weight_format)
    if plan.act_mode == "static":
        layer.act_scale.fill_(plan.act_scale)
    return layer


def _build(linear: nn.Module, plan: LayerPlan, config: BitConfig) -> QuantLinear:
    return QuantLinear.from_linear(linear, plan.w_bits, plan.act_mode, config.group_size, plan.act_scale,
                                   plan.float_rows, config.weight_format)


def _set_kernel(model: nn.Module, plans: dict[str, LayerPlan], config: BitConfig, kernel: str) -> KernelChoice:
    quantized = [model.get_submodule(name) for name in plans]
    choice = SELECTOR.choose(quantized, config.weight_format, kernel)
    for layer in quantized:
        layer.kernel = choice.path
    log.info("MixDQ %s kernel: %s (%s)", config.name, choice.path, choice.why)
    return choice


def cache_path(cache_dir: str | Path, model_hash: str, config: BitConfig) -> Path:
    return Path(cache_dir) / f"mixdq-{model_hash}-{config.digest()}-{CACHE_FORMAT}.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _from_cache(path: Path, model: nn.Module, plans: dict[str, LayerPlan], config: BitConfig) -> dict[str, QuantLinear] | None:
    """Quantized layers from a cache file (staged in RAM, copied to each layer's device), or None."""
    try:
        tensors = load_tensors(path)
    except Exception as error:  # a truncated or foreign file: rebuild rather than fail the toggle
        log.warning("MixDQ cache %s unreadable (%r); re-quantizing", path.name, error)
        return None
    built = {}
    for name, plan in plans.items():
        layer = _empty_quant(model.get_submodule(name), plan, config)
        wanted = {k: f"{name}.{k}" for k, _ in layer.named_buffers()}
        if any(key not in tensors or tensors[key].shape != getattr(layer, k).shape
               or tensors[key].dtype != getattr(layer, k).dtype for k, key in wanted.items()):
            log.warning("MixDQ cache %s does not match the model; re-quantizing", path.name)
            return None
        layer.load_state_dict({k: tensors[key] for k, key in wanted.items()})
        built[name] = layer
    return built


def _tensors(originals: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": t for name, module in originals.items() for k, t in module.named_parameters()}


def _to_ram(name: str, module: nn.Module) -> dict[str, torch.device]:
    """Move one original layer's tensors to CPU RAM; returns where each was (A1111's low-VRAM modes
    keep parts of a model on different devices, and restore puts every tensor back where it was)."""
    devices = {}
    for k, t in module.named_parameters():
        devices[f"{name}.{k}"] = t.device
        if t.device.type != "cpu":
            t.data = t.data.to("cpu")
    return devices


def _spill(originals: dict[str, nn.Module], devices: dict[str, torch.device], spill_dir: Path | None) -> Path | None:
    """Write the originals that already lived in RAM to a file and drop them, so RAM is freed too."""
    tensors = {k: t for k, t in _tensors(originals).items() if devices[k].type == "cpu"}
    if spill_dir is None or not tensors:
        return None
    spill_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=spill_dir, prefix="mixdq-originals-", suffix=".safetensors")
    os.close(fd)
    save_file({k: t.detach().contiguous() for k, t in tensors.items()}, path)
    for t in tensors.values():
        t.data = torch.empty(0, dtype=t.dtype)
    return Path(path)


def _bring_back(originals: dict[str, nn.Module], devices: dict[str, torch.device], spill_path: Path | None) -> None:
    tensors = _tensors(originals)
    if spill_path is not None:
        with SafetensorsReader(spill_path) as spilled:
            for key in spilled.keys():  # noqa: SIM118 (a reader, not a dict)
                tensors[key].data = spilled.get_tensor(key)
        spill_path.unlink(missing_ok=True)
    for key, t in tensors.items():
        if t.device != devices[key]:
            t.data = t.data.to(devices[key])


@torch.no_grad()
def quantize(model: nn.Module, config: BitConfig, cache_dir: str | Path | None = None,
             model_hash: str | None = None, spill_dir: str | Path | None = None, kernel: str = "auto") -> MixDQState:
    """Quantize ``model`` in place with ``config``; raises :class:`ConfigError` before touching it.

    ``kernel``: ``auto`` times the paths of :data:`~lib_sd3.mixdq.kernels.PATHS` on the model's
    shapes and keeps the fastest that passes the fidelity check; a path name forces that one.
    """
    if state(model) is not None:
        raise RuntimeError("model is already MixDQ-quantized; restore it first")
    start = time.perf_counter()
    plans = resolve(config, model)
    before = module_bytes(model)
    path = None
    if cache_dir:  # the checkpoint hash names the file; the fingerprint catches weights changed since (LoRA merges)
        key = f"{model_hash}-{fingerprint(model)}" if model_hash else fingerprint(model)
        path = cache_path(cache_dir, key, config)
    cached = _from_cache(path, model, plans, config) if path and path.is_file() else None
    originals: dict[str, nn.Module] = {}
    devices: dict[str, torch.device] = {}
    for name, plan in plans.items():  # one layer at a time: peak memory = model + one quantized layer
        layer = cached[name] if cached else _build(model.get_submodule(name), plan, config)
        originals[name] = swap_module(model, name, layer)
        devices.update(_to_ram(name, originals[name]))
    if cached is None and path is not None:
        _atomic_save({f"{n}.{k}": t for n in plans for k, t in model.get_submodule(n).named_buffers()}, path)
    spill = _spill(originals, devices, Path(spill_dir) if spill_dir else None)
    cache_hit = cached is not None
    choice = _set_kernel(model, plans, config, kernel)
    result = MixDQState(config, originals, devices, spill, before, module_bytes(model), cache_hit,
                        time.perf_counter() - start, choice)
    setattr(model, STATE_ATTR, result)
    log.info("MixDQ %s: %d layers, %.0f -> %.0f MB%s", config.name, len(plans), before / 2**20,
             result.bytes_after / 2**20, " (from cache)" if cache_hit else "")
    return result


@torch.no_grad()
def restore(model: nn.Module) -> MixDQState | None:
    """Put the original float layers back (bit-identical); a no-op on an unquantized model."""
    current = state(model)
    if current is None:
        return None
    _bring_back(current.originals, current.devices, current.spill_path)
    for name, original in current.originals.items():
        swap_module(model, name, original)
    delattr(model, STATE_ATTR)
    log.info("MixDQ off: %d layers restored", len(current.originals))
    return current
