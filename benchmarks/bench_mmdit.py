"""One MMDiT forward, ours (``lib_sd3.models.mmdit``) against diffusers' ``SD3Transformer2DModel`` on the same weights.

    python benchmarks/bench_mmdit.py              # CPU, 2 threads, ~1-3 minutes

A sampling step is one such forward on a CFG pair, so this is the time an A1111 user waits per
step. The shapes are a step's (batch 2 = one CFG pair, a 64x64 latent = 1024 image tokens, 154
text tokens of width 4096, a 2048-wide pooled vector) on an MMDiT of depth 8 / hidden 512, with
random weights (norm scales far from 1) written under Stability's key names and loaded through
``lib_sd3.models.mmdit_load``, as the WebUI loads a checkpoint.

- ``vs_diffusers_fp32`` / ``vs_diffusers_bf16``: our median forward time / diffusers', SD3.5 Large
  layout (qk-norm). ``vs_diffusers_medium_fp32``: SD3.5 Medium layout (qk-norm, MMDiT-X blocks 0 and 1).
  ``vs_diffusers_sd3_fp32``: SD3 Medium layout (no qk-norm). Goal <= 0.95 each.
  Wall-clock medians over ``--repeats`` rounds, ours and diffusers interleaved (the order alternates
  each round), after one warm-up call each; ``cpu_*`` is the same ratio of process CPU time, which a
  shared machine disturbs less, and ``paired_*`` the median of each round's ours / diffusers ratio
  (the two calls of a round run back to back, so a load that comes and goes shifts both).
- ``max_abs_err``: largest |ours - diffusers| over the fp32 configurations (goal <= 1e-4).

Both models hold their weights in their own (anonymous) memory, as in the WebUI. Under glibc's default
allocator the big activations of a forward are fresh pages each time (mmap above a moving threshold), so
page faults -- costly in a VM -- are part of every figure and move a ratio by several percent from one
process to the next; ours allocates fewer fresh tensors. For the forward's compute alone (as on a GPU,
whose caching allocator keeps its memory), hold the allocator still:

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/bench_mmdit.py

The last line is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from lib_sd3.models.mmdit import MMDiT  # noqa: E402
from tests import tiny_sd35  # noqa: E402

DEPTH = 8  # hidden 64 * 8 = 512, 8 heads
LATENT = 64  # 64x64 latent, patch 2: 1024 image tokens
CONTEXT_TOKENS = 154  # 77 CLIP + 77 T5, as A1111 builds it
CONTEXT_DIM, ADM_DIM = 4096, 2048
POS_EMBED_MAX_SIZE = 48
BATCH = 2
CONFIGS = (  # (key, family, dtype)
    ("fp32", "sd3.5-large", torch.float32),
    ("bf16", "sd3.5-large", torch.bfloat16),
    ("medium_fp32", "sd3.5-medium", torch.float32),
    ("sd3_fp32", "sd3-medium", torch.float32),
)


def _models(family: str, dtype: torch.dtype, folder: Path):
    path = folder / f"{family}.safetensors"
    reference = tiny_sd35.diffusers_model(family, depth=DEPTH, context_dim=CONTEXT_DIM, adm_dim=ADM_DIM,
                                          pos_embed_max_size=POS_EMBED_MAX_SIZE)
    from safetensors.torch import save_file

    save_file(tiny_sd35.stability_checkpoint(reference), str(path))
    detected, mapped = tiny_sd35.load_mmdit(path, dtype=dtype)
    # copied into the model's own memory, as A1111's load_state_dict does (the loaded tensors of an fp32 file
    # are pages of the file's mapping; measured side by side, that made no difference to the time)
    ours = MMDiT(detected.config, dtype=dtype).eval()
    ours.load_state_dict(mapped.state_dict())
    return reference.to(dtype), ours


def _inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 16, LATENT, LATENT, generator=g)
    context = torch.randn(BATCH, CONTEXT_TOKENS, CONTEXT_DIM, generator=g)
    pooled = torch.randn(BATCH, ADM_DIM, generator=g)
    return x.to(dtype), context.to(dtype), pooled.to(dtype), torch.full((BATCH,), 500.0)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(family: str, dtype: torch.dtype, repeats: int, folder: Path) -> dict[str, float]:
    reference, ours = _models(family, dtype, folder)
    x, context, pooled, t = _inputs(dtype)

    def run_ours():
        return ours(x, t, y=pooled, context=context)

    def run_diffusers():
        return reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=t).sample

    times = {"ours": [], "diffusers": []}
    with torch.inference_mode():
        err = (run_ours().float() - run_diffusers().float()).abs().max().item()  # also the warm-up
        for round_ in range(repeats):
            order = (("ours", run_ours), ("diffusers", run_diffusers))
            for name, fn in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(_timed(fn))
    med = {name: [statistics.median(column) for column in zip(*rows, strict=True)] for name, rows in times.items()}
    paired = statistics.median(o[0] / d[0] for o, d in zip(times["ours"], times["diffusers"], strict=True))
    return {"ratio": med["ours"][0] / med["diffusers"][0], "cpu_ratio": med["ours"][1] / med["diffusers"][1],
            "paired_ratio": paired, "ours_s": med["ours"][0], "diffusers_s": med["diffusers"][0], "err": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the bf16 cast warns about modules "kept in float32" (there are none)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, family, dtype in CONFIGS:
            r = results[key] = measure(family, dtype, args.repeats, Path(tmp))
            print(f"{key:12s} {family:13s} ours {r['ours_s']:.3f} s, diffusers {r['diffusers_s']:.3f} s "
                  f"(medians of {args.repeats}): {r['ratio']:.3f} wall, {r['cpu_ratio']:.3f} cpu, "
                  f"{r['paired_ratio']:.3f} paired; "
                  f"max |ours - diffusers| {r['err']:.2e}", flush=True)
    err = max(r["err"] for key, r in results.items() if key.endswith("fp32"))
    fields = [f"vs_diffusers_{key}={r['ratio']:.3f}" for key, r in results.items()]
    fields += [f"cpu_vs_diffusers_{key}={r['cpu_ratio']:.3f}" for key, r in results.items()]
    fields += [f"paired_vs_diffusers_{key}={r['paired_ratio']:.3f}" for key, r in results.items()]
    print(" ".join(fields) + f" max_abs_err={err:.2e}")


if __name__ == "__main__":
    main()
