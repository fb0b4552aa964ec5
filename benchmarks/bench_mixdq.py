"""MixDQ on SD3's MMDiT: weight memory, output fidelity and int8 GEMM speed, side by side.

    python benchmarks/bench_mixdq.py                 # CPU, ~2 minutes: 2 blocks at width 1536
    python benchmarks/bench_mixdq.py --device cuda   # GPU: the same, plus step time and memory at 24 blocks

The transformer is diffusers' ``SD3Transformer2DModel`` with SD3 Medium's config (width 1536,
24 heads, context 4096, pooled 2048) and ``--blocks`` joint blocks, randomly initialised (no
checkpoint is needed, or available offline). Its text input mimics SD3's: 154 tokens whose first
(CLIP's BOS) is ~30x larger than the rest. Fidelity on random weights is a proxy for the real
model. Memory does not depend on the weights' values: ``w8a8_mem_ratio`` / ``w4a8_mem_ratio`` are
for the full 24-block SD3 Medium in fp16 (built on the meta device, pos_embed included), and
``*_mem_ratio_<N>blocks`` are measured on real tensors of the few-block model benchmarked (where
the float-kept embedders weigh more).

Speed: each quantized Linear (activation quantization, int8 GEMM and rescale all included) is
timed against the float Linear on the same input, interleaved, ``--repeats`` times; medians, once
per kernel path that runs on the device (``w8a8_eager``, ``w8a8_compiled``, ``fp8``, ...), and
``w8a8`` is the path the library's own selection picks there (``kernel=``). A ``# M= K= N=`` line
per GEMM shape shows where the time goes, in µs. ``cpu_quant_overhead`` = (W8A8 layer time - bare
int8 GEMM time) / bare int8 GEMM time, times summed over the three shapes: what quantizing the
activations and rescaling cost beside the GEMM, the floor of this design.

SD3.5 Large (38 blocks, width 2432, qk-norm): ``large_w8a8_gb`` / ``large_w4a8_gb`` are the
quantized MMDiT's bytes in GiB (embedders, norms, qk-norm and pos_embed in fp16), computed from
the layer shapes and the real quantized tensors' sizes on the meta device -- the same on every
device (``large_source=computed_from_shapes``); what an allocator adds is rounding.

On CUDA (24 blocks, 1024 px, batch 1): ``gpu_w8a8_step_ratio`` / ``gpu_fp8_step_ratio`` = fp16
step time / quantized step time; ``gpu_w8a8_mem_ratio`` / ``gpu_w4a8_mem_ratio`` = allocated
memory of the quantized / fp16 model. The last line is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib_sd3 import LOGGER_NAME, get_logger  # noqa: E402
from lib_sd3.mixdq import config, kernels, layers, model, quantizers, selection, shipped  # noqa: E402
from lib_sd3.mixdq.qlinear import QuantLinear  # noqa: E402

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TEXT_TOKENS = 154  # 77 CLIP + 77 T5
IMAGE_TOKENS_1024PX = 4096  # (1024 / 8 / 2)^2
BOS_GAIN = 30.0
GEMM_SHAPES = ((1536, 1536), (1536, 6144), (6144, 1536))  # (K, N): attention proj, MLP fc1, MLP fc2
LAST_KEYS = ("cpu_quant_overhead", "gpu_w8a8_step_ratio", "gpu_fp8_step_ratio", "gpu_w8a8_mem_ratio",
             "gpu_w4a8_mem_ratio", "large_w8a8_gb", "large_w4a8_gb")
"""The issue's headline keys, last on the line in this order (``cpu_quant_overhead`` only on CPU)."""
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=64 * 38, qk_norm="rms_norm")


def transformer(blocks: int, width_heads: int, latent: int, device: str, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    config = dict(SD3_MEDIUM, num_layers=blocks, num_attention_heads=width_heads,
                  caption_projection_dim=64 * width_heads, pos_embed_max_size=max(latent // 2, 8))
    with torch.device(device):  # built where it runs: 24 blocks are 8 GB in fp32, slow to init on a CPU
        m = SD3Transformer2DModel(**config)
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for _, linear in layers.linear_layers(m):
            linear.weight.copy_(trained_like(linear.weight.shape, g))
            if linear.bias is not None:
                linear.bias.zero_()
    return m.to(dtype).eval()


def trained_like(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Variance-preserving (std 1/sqrt(K)) weights with heavy tails, a stand-in for trained ones.

    PyTorch's default init shrinks every block's output (and diffusers zero-inits some), so a
    random SD3 is nearly the identity on its positional embedding and hides quantization error
    entirely (cosine 1.00000). A Gaussian scale mixture ``n1 * exp(n2 / 2)`` has the outlier
    weights that make real checkpoints hard to quantize.
    """
    w = torch.randn(shape, generator=g, device=g.device) * torch.exp(0.5 * torch.randn(shape, generator=g, device=g.device))
    return w * (1.0 / (w.std() * math.sqrt(shape[1])))


def inputs(m, latent: int, batch: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, TEXT_TOKENS, m.config.joint_attention_dim, generator=g)
    context[:, 0] *= BOS_GAIN
    return {"x": torch.randn(batch, m.config.in_channels, latent, latent, generator=g).to(device, dtype),
            "context": context.to(device, dtype),
            "pooled": torch.randn(batch, m.config.pooled_projection_dim, generator=g).to(device, dtype)}


def velocity(m, x, s: float, ins) -> torch.Tensor:
    t = torch.full((x.shape[0],), 1000 * s, device=x.device, dtype=x.dtype)
    return m(hidden_states=x, timestep=t, encoder_hidden_states=ins["context"], pooled_projections=ins["pooled"],
             return_dict=False)[0]


def flow_levels(steps: int, shift: float = 3.0) -> list[float]:
    ts = [1 - i / steps for i in range(steps)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts] + [0.0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """PSNR over the reference latent's range: 10 log10(range^2 / MSE)."""
    ref64, out64 = ref.double(), out.double()
    mse = float((ref64 - out64).pow(2).mean())
    span = float(ref64.max() - ref64.min())
    return math.inf if mse == 0 else 10 * math.log10(span**2 / mse)


@torch.no_grad()
def trajectory(m, ins, steps: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, float]], list[torch.Tensor]]:
    """Euler on the flow ODE from ``ins["x"]``: final latent, each step's (x, s), each step's velocity."""
    x, points, vs = ins["x"], [], []
    levels = flow_levels(steps)
    for s, s_next in zip(levels[:-1], levels[1:], strict=True):
        v = velocity(m, x, s, ins)
        points.append((x, s))
        vs.append(v)
        x = x + (s_next - s) * v
    return x, points, vs


@torch.no_grad()
def fidelity(m, ins, reference, config) -> dict[str, float]:
    """Velocity cosine at the float trajectory's points (worst step), and PSNR of the sampled latents."""
    ref_latent, points, ref_v = reference
    model.quantize(m, config)
    try:
        q_v = [velocity(m, x, s, ins) for x, s in points]
        q_latent, _, _ = trajectory(m, ins, len(points))
    finally:
        model.restore(m)
    return {"cosine": min(cosine(a, b) for a, b in zip(ref_v, q_v, strict=True)), "psnr": psnr(ref_latent, q_latent)}


def memory_ratios(m, configs: dict[str, object]) -> dict[str, float]:
    """Measured: bytes of the fp16 model before and after quantizing it with each config
    (an fp16 copy when the benchmarked model is fp32, i.e. on CPU)."""
    m16 = m if next(m.parameters()).dtype == torch.float16 else copy.deepcopy(m).to(torch.float16)
    ratios = {}
    for kind, cfg in configs.items():
        state = model.quantize(m16, cfg, kernel="weight_only")  # bytes only: no kernel timing needed
        ratios[kind] = state.bytes_after / state.bytes_before
        model.restore(m16)
    return ratios


def meta_bytes(kind: str, shape: dict[str, object]) -> tuple[int, int]:
    """fp16 bytes of a full-size transformer before and after quantizing with the shipped ``kind``,
    without allocating it: built on the meta device, each configured Linear replaced by a
    :class:`QuantLinear` constructed there too; the buffers' shapes and dtypes are the real
    allocation, so ``module_bytes`` counts what a GPU would hold (pos_embed included)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        full = SD3Transformer2DModel(**shape).to(torch.float16)
    before = model.module_bytes(full)
    cfg = config.load(kind)
    for name, plan in config.resolve(cfg, full).items():
        linear = full.get_submodule(name)
        model.swap_module(full, name, QuantLinear(linear.in_features, linear.out_features, plan.w_bits,
                                                  plan.act_mode, linear.bias is not None, torch.float16,
                                                  "meta", cfg.group_size, plan.float_rows, cfg.weight_format))
    return before, model.module_bytes(full)


def timed(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each function, run interleaved so load changes hit all of them alike."""
    for fn in fns.values():  # warm-up (allocations, kernel selection)
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def gemm_speed(device: str, repeats: int, tokens: int, dtypes: tuple[torch.dtype, ...]) -> tuple[dict[str, float], str]:
    """Quantized Linear (W8A8 on each kernel path, W4A8, FP8) vs float Linear at SD3 shapes, summed over
    shapes, and the W8A8 path the library's selection picks on these three layers.

    Per shape it also prints where the time goes: the bare int8 GEMM with the weight as stored
    (``(N, K)``, passed transposed: column-major B), on CUDA the same GEMM with a row-major ``(K, N)``
    copy (the old layout, for comparison), and the per-token activation quantization alone.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    int_paths = [p for p, path in kernels.PATHS.items() if "int" in path.formats and p != "weight_only"
                 and kernels.missing(p, device) is None]
    layers_w8: list[QuantLinear] = []
    totals: dict[str, float] = {}
    for k, n in GEMM_SHAPES:
        torch.manual_seed(0)
        base = torch.nn.Linear(k, n).to(device)
        x32 = torch.randn(1, tokens, k, device=device)
        fns: dict[str, Callable[[], object]] = {}
        for dtype in dtypes:
            lin = copy.deepcopy(base).to(dtype)
            x = x32.to(dtype)
            name = str(dtype).removeprefix("torch.")
            fns[name] = lambda lin=lin, x=x: lin(x)
            if dtype == dtypes[0]:
                w8, w4 = QuantLinear.from_linear(lin, 8), QuantLinear.from_linear(lin, 4)
                f8 = QuantLinear.from_linear(lin, 8, weight_format="fp8")
                layers_w8.append(w8)
                x2 = x.reshape(-1, k)
                for path in int_paths:
                    fns[f"w8a8_{path}"] = lambda q=w8, x2=x2, path=path: q.run(x2, path)
                    fns[f"w4a8_{path}"] = lambda q=w4, x2=x2, path=path: q.run(x2, path)
                for path in ("fp8", "fp8_compiled"):
                    if kernels.missing(path, device) is None:
                        fns[path] = lambda q=f8, x2=x2, path=path: q.run(x2, path)
                qa = torch.randint(-127, 128, (tokens, k), dtype=torch.int8, device=device)
                w_kn = w8.qweight.t().contiguous()
                fns["bare_int_mm"] = lambda a=qa, w=w8.qweight: torch._int_mm(a, w.t())
                if device == "cuda":  # the CPU's oneDNN runs both layouts alike; spare its minutes
                    fns["int_mm_row_major_b"] = lambda a=qa, b=w_kn: torch._int_mm(a, b)
                fns["act_quant"] = lambda x2=x2: quantizers.quantize_per_token(x2)
        shape_times = timed(fns, repeats, sync)
        print(f"# M={tokens} K={k} N={n} " + " ".join(f"{key}_us={1e6 * sec:.0f}" for key, sec in shape_times.items()),
              flush=True)
        for key, seconds in shape_times.items():
            totals[key] = totals.get(key, 0.0) + seconds
    choice = selection.Selector().choose(layers_w8, "int")
    print(f"# selection on these layers: {choice.path} ({choice.why})", flush=True)
    for kind in ("w8a8", "w4a8"):
        totals[kind] = totals.get(f"{kind}_{choice.path}", totals.get(f"{kind}_eager", math.nan))
    return totals, choice.path


@torch.no_grad()
def step_time(m, ins, repeats: int, configs: dict[str, object], device: str) -> dict[str, float]:
    """One transformer call (a sampler step) in float and under each config, interleaved."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {"float": timed({"float": lambda: velocity(m, ins["x"], 0.7, ins)}, repeats, sync)["float"]}
    for name, cfg in configs.items():
        model.quantize(m, cfg)
        try:
            result[name] = timed({name: lambda: velocity(m, ins["x"], 0.7, ins)}, repeats, sync)[name]
        finally:
            model.restore(m)
    return result


def allocated(m) -> int:
    """Bytes allocated on the model's device: the CUDA allocator's count on a GPU, the tensors' own elsewhere."""
    device = next(m.buffers(), next(m.parameters())).device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device)
    return model.module_bytes(m)


def step_and_memory(m, ins, configs: dict[str, object], repeats: int) -> dict[str, float]:
    """The GPU headline: fp16 step time / quantized step time (``gpu_*_step_ratio``) and allocated memory
    after / before quantizing (``gpu_*_mem_ratio``). Device-agnostic, so the tests run it on CPU."""
    device = ins["x"].device.type
    steps = step_time(m, ins, repeats, configs, device)
    out = {f"{device}_step_ms_{key}": round(1000 * seconds, 1) for key, seconds in steps.items()}
    out["gpu_w8a8_step_ratio"] = round(steps["float"] / steps["w8a8"], 3)
    out["gpu_fp8_step_ratio"] = round(steps["float"] / steps["fp8"], 3)
    for kind in ("w8a8", "w4a8"):
        before = allocated(m)
        model.quantize(m, configs[kind])
        out[f"gpu_{kind}_mem_ratio"] = round(allocated(m) / before, 4)
        model.restore(m)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--blocks", type=int, help="joint blocks (default: 2 on CPU, 24 on CUDA)")
    parser.add_argument("--heads", type=int, default=24, help="width = 64 x heads (24 = SD3 Medium's 1536)")
    parser.add_argument("--latent", type=int, help="latent side for fidelity (default 32 on CPU = 256 px, 128 on CUDA)")
    parser.add_argument("--steps", type=int, default=3, help="sampler steps for the fidelity run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=IMAGE_TOKENS_1024PX + TEXT_TOKENS, help="M of the GEMM test")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args(argv)

    get_logger()  # set the handler up first, then quiet it
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)  # no per-toggle INFO lines in the output
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    blocks = args.blocks or (24 if cuda else 2)
    latent = args.latent or (128 if cuda else 32)
    dtype = torch.float16 if cuda else torch.float32  # CPU fp16 matmuls are slow: fidelity runs in fp32 there
    start = time.perf_counter()

    m = transformer(blocks, args.heads, latent, args.device, dtype)
    print(f"# model built at {time.perf_counter() - start:.0f}s", flush=True)
    names = [n for n, _ in layers.linear_layers(m)]
    configs = {kind: shipped.preset(kind, names) for kind in ("w8a8", "w4a8", "fp8")}
    out: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "blocks": blocks,
                              "width": 64 * args.heads}
    if args.heads == 24:  # the headlines: SD3 Medium itself, all 24 blocks, and SD3.5 Large, 38 blocks
        for kind in configs:
            before, after = meta_bytes(kind, SD3_MEDIUM)
            out[f"{kind}_mem_ratio"] = round(after / before, 4)
            out[f"large_{kind}_gb"] = round(meta_bytes(kind, SD35_LARGE)[1] / 2**30, 3)
        out["large_fp16_gb"] = round(meta_bytes("w8a8", SD35_LARGE)[0] / 2**30, 3)
        out["large_source"] = "computed_from_shapes"
    for kind, ratio in memory_ratios(m, configs).items():  # measured on the model benchmarked here
        out[f"{kind}_mem_ratio_{blocks}blocks"] = round(ratio, 4)
    print(f"# memory done at {time.perf_counter() - start:.0f}s", flush=True)
    ins = inputs(m, latent, 1, args.device, dtype)
    reference = trajectory(m, ins, args.steps)
    out["float_finite"] = bool(torch.isfinite(reference[0]).all())
    for kind, cfg in configs.items():
        fid = fidelity(m, ins, reference, cfg)
        out[f"{kind}_cosine"] = round(fid["cosine"], 5)
        out[f"{kind}_psnr_db"] = round(fid["psnr"], 2)
    print(f"# memory and fidelity done at {time.perf_counter() - start:.0f}s", flush=True)

    speed_dtypes = (torch.float16, torch.bfloat16) if cuda else (torch.float32,)
    speed, chosen = gemm_speed(args.device, args.repeats, args.tokens, speed_dtypes)
    prefix = "cuda" if cuda else "cpu"
    base = speed[str(speed_dtypes[0]).removeprefix("torch.")]
    out[f"{prefix}_kernel"] = chosen
    out[f"{prefix}_int8_speedup"] = round(base / speed["w8a8"], 3)
    out[f"{prefix}_w4a8_speedup"] = round(base / speed["w4a8"], 3)
    out[f"{prefix}_bare_int_mm_speedup"] = round(base / speed["bare_int_mm"], 3)
    for key in sorted(k for k in speed if k.startswith("w8a8_")):  # every path, for the docs' table
        out[f"{prefix}_quant_overhead_{key.removeprefix('w8a8_')}"] = round(speed[key] / speed["bare_int_mm"] - 1, 4)
    out[f"{prefix}_quant_overhead"] = round(speed["w8a8"] / speed["bare_int_mm"] - 1, 4)
    if cuda:
        out["cuda_int8_speedup_vs_bf16"] = round(speed["bfloat16"] / speed["w8a8"], 3)
        out.update(step_and_memory(m, inputs(m, 128, 1, args.device, dtype), configs, args.repeats))  # 1024 px, batch 1
    out["seconds"] = round(time.perf_counter() - start, 1)
    out = {k: out[k] for k in [k for k in out if k not in LAST_KEYS] + [k for k in LAST_KEYS if k in out]}
    print(" ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
