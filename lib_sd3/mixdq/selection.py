"""Pick the kernel path a quantized model runs, by timing the candidates on its own layer shapes.

Which path is fastest depends on the device, not on a rule: on a GPU eager per-token quantization
costs more than the int8 GEMM itself (so a fused compiled kernel or FP8 wins; docs/mixdq.md), on a CPU oneDNN's int8 GEMM
dominates and the fused path only saves passes over memory, and where Triton or a C++ compiler is
missing only eager and weight-only exist. So at quantize time every path in
:data:`~lib_sd3.mixdq.kernels.PATHS` that serves the config's weight format and can run on the
device is run once on each distinct (K, N) of the model's activation-quantized layers with
:data:`TIMING_ROWS` tokens, checked against the dequantized (weight-only) product, and timed; the
fastest that passes wins (one path for the whole model: a sum over shapes is steadier under load
than a choice per shape). A path that raises or fails the check is dropped, with its reason.
Results are remembered per device, dtype and shape set, so a second toggle does not time again.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from lib_sd3 import get_logger
from lib_sd3.mixdq import kernels
from lib_sd3.mixdq.qlinear import QuantLinear

log = get_logger("mixdq")

TIMING_ROWS = 1024
"""Tokens per timed call: a 512 px image's 1024 image tokens (1024 px has 4096; the ranking of the
paths holds from 1k tokens up, and timing stays well under a second per path on a CPU)."""

TIMING_REPEATS = 5
"""Interleaved rounds; each path's time is its fastest round (the least disturbed by other load)."""
MIN_TIMED_WEIGHTS = 1 << 20
"""Below this many weights in the largest layer (1024 x 1024), dispatch overhead decides, not the
kernel: no timing, and no compile; the default path of the format runs (eager int8, or fp8)."""

FIDELITY_COSINE = 0.995
"""A path's output vs the weight-only product of the same codes: W8A8 lands at ~0.9999; a broken
kernel (wrong layout, overflow, NaN) far below."""

DEFAULTS = {"int": "eager", "fp8": "fp8"}


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """The path chosen, why, and what was measured (ms summed over the model's layers at TIMING_ROWS)."""

    path: str
    why: str
    timings_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)

    def report(self) -> dict[str, object]:
        return {"kernel": self.path, "kernel_why": self.why, "kernel_what": kernels.PATHS[self.path].what,
                "kernel_timings_ms": dict(self.timings_ms), "kernel_rejected": dict(self.rejected)}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Selector:
    """Chooses paths and remembers the choices for this session (the cache is the object's state)."""

    def __init__(self) -> None:
        self.choices: dict[tuple, KernelChoice] = {}

    @torch.no_grad()
    def choose(self, quantized: list[QuantLinear], weight_format: str, forced: str = "auto") -> KernelChoice:
        """The path for these layers; ``forced`` names one (it still has to be able to run here)."""
        timed = [q for q in quantized if q.act_mode != "float"]
        if not timed:
            return KernelChoice("weight_only", "no layer quantizes its activations")
        probe = timed[0].wscale
        device, dtype = probe.device, timed[0].compute_dtype
        counts: dict[tuple[int, int, int], int] = {}
        layer_of: dict[tuple[int, int, int], QuantLinear] = {}
        for q in timed:
            shape = (q.in_features, q.out_features, q.w_bits)
            counts[shape] = counts.get(shape, 0) + 1
            layer_of.setdefault(shape, q)
        rejected = {name: reason for name, path in kernels.PATHS.items() if weight_format in path.formats
                    and (reason := kernels.missing(name, device)) is not None}
        candidates = [name for name, path in kernels.PATHS.items()
                      if weight_format in path.formats and name not in rejected]
        if forced != "auto":
            if forced not in kernels.PATHS or weight_format not in kernels.PATHS[forced].formats:
                raise ValueError(f"kernel {forced!r} does not serve {weight_format} weights; "
                                 f"known: {[n for n, p in kernels.PATHS.items() if weight_format in p.formats]}")
            if forced in rejected:
                return KernelChoice("weight_only", f"{forced} was asked for but {rejected[forced]}", {}, rejected)
            return KernelChoice(forced, "asked for", {}, rejected)
        largest = max(k * n for k, n, _ in counts)
        if largest < MIN_TIMED_WEIGHTS:
            default = DEFAULTS[weight_format]
            path = default if default in candidates else "weight_only"
            return KernelChoice(path, f"layers too small to time (largest {largest} weights < {MIN_TIMED_WEIGHTS}): "
                                      "the format's default", {}, rejected)
        key = (device, dtype, weight_format, tuple(sorted(counts.items())), tuple(candidates))
        if key not in self.choices:
            self.choices[key] = self._measure(layer_of, counts, candidates, rejected, device, dtype)
        return self.choices[key]

    def _measure(self, layer_of, counts, candidates, rejected, device, dtype) -> KernelChoice:
        rejected = dict(rejected)
        g = torch.Generator(device=device).manual_seed(0)
        inputs = {shape: torch.randn(TIMING_ROWS, shape[0], generator=g, device=device).to(dtype) for shape in layer_of}
        reference = {shape: layer_of[shape].run(x, "weight_only") for shape, x in inputs.items()}
        if "compiled" in candidates:
            log.info("MixDQ: compiling the fused kernel to time it (once per session; can take a minute on a CPU)")
        passed = []
        for path in candidates:
            try:
                for shape, x in inputs.items():  # first call: compile / warm up, and the fidelity check
                    out = layer_of[shape].run_path(x, path)
                    if out is None:
                        raise RuntimeError("the kernel declined this shape")
                    if not bool(torch.isfinite(out).all()) or _cosine(out, reference[shape]) < FIDELITY_COSINE:
                        raise RuntimeError(f"fidelity check failed at K={shape[0]} N={shape[1]} "
                                           f"(cosine {_cosine(out, reference[shape]):.4f} < {FIDELITY_COSINE})")
            except Exception as error:  # noqa: BLE001 -- any failure means "not this path here"
                rejected[path] = str(error).splitlines()[0] if str(error) else type(error).__name__
                continue
            passed.append(path)
        best_seconds = {(path, shape): float("inf") for path in passed for shape in inputs}
        for _ in range(TIMING_REPEATS):  # rounds interleave the paths, so load changes hit them alike
            for path in passed:
                for shape, x in inputs.items():
                    _sync(device)
                    start = time.perf_counter()
                    layer_of[shape].run_path(x, path)
                    _sync(device)
                    best_seconds[path, shape] = min(best_seconds[path, shape], time.perf_counter() - start)
        timings = {path: round(1000 * sum(best_seconds[path, shape] * counts[shape] for shape in inputs), 2)
                   for path in passed}
        best = min(timings, key=timings.get)
        ranked = ", ".join(f"{p} {ms:.1f} ms" for p, ms in sorted(timings.items(), key=lambda kv: kv[1]))
        why = f"fastest on {device.type} at {TIMING_ROWS} tokens over the model's layers: {ranked}"
        if rejected:
            why += "; not used: " + "; ".join(f"{p} ({r})" for p, r in rejected.items())
        return KernelChoice(best, why, timings, rejected)


SELECTOR = Selector()
