"""SD3 LoRA: exactness of every file layout, cost of applying one, cost of LoRA on a MixDQ W8A8 model.

    python benchmarks/bench_lora.py              # CPU, ~1-2 minutes
    python benchmarks/bench_lora.py --device cuda

1. ``max_abs_err`` / ``formats_ok``: a random rank-4 peft LoRA on every Linear of a tiny diffusers
   ``SD3Transformer2DModel``, saved in each layout (tests/lora_formats.py), loaded through
   ``lib_sd3.lora`` onto the Stability-layout weights: the denoiser output against peft's own model at
   strengths 0.5 and 1.0 (fp32); a layout is ok when its worst error is below 1e-4.
2. ``apply_overhead``: applying a diffusers-layout LoRA (``--rank``) to SD3 Medium-width weights
   (``--blocks`` joint blocks at width 1536) through our path, key normalising and q/k/v fusing included,
   divided by the floor, a bare ``W[rows] += scale * (B @ A)`` of the same layers with the names known
   in advance. Best of ``--repeats``, interleaved (the best time is the cost; the rest is other load on a
   shared machine).
3. ``quantized_lora_overhead``: one denoiser step of a W8A8 (MixDQ ``QuantLinear``) MMDiT with the same
   kind of LoRA on every quantized layer (float side path) / the same step without LoRA.

The last line is ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lib_sd3.lora import deltas, keys, names, sidepath  # noqa: E402

TOL = 1e-4
SD3_MEDIUM_WIDTH = 1536


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def oracle() -> tuple[float, int, int]:
    import lora_formats as lf

    base = lf.tiny_transformer(0)
    peft_model = copy.deepcopy(base)
    peft_sd = lf.add_peft_lora(peft_model, "a", seed=10)
    worst, ok = 0.0, 0
    for fmt, convert in sorted(lf.FORMATS.items()):
        file = convert(peft_sd, base)
        fmt_err = 0.0
        for strength in (0.5, 1.0):
            stability = lf.to_stability(base)
            norm = keys.normalise(file, {"unet": {n: tuple(w.shape) for n, w in stability.items()}})
            deltas.merge(stability, {m: w for (_, m), w in norm.modules.items()}, strength)
            model = copy.deepcopy(base)
            lf.from_stability(model, stability)
            peft_model.set_adapters(["a"], [strength])
            with torch.no_grad():
                err = (model(**lf.inputs()).sample - peft_model(**lf.inputs()).sample).abs().max().item()
            fmt_err = max(fmt_err, err if not norm.unmatched else float("inf"))
        print(f"# {fmt:14s} max |ours - peft| = {fmt_err:.2e}")
        worst, ok = max(worst, fmt_err), ok + (fmt_err < TOL)
    return worst, ok, len(lf.FORMATS)


def stability_layout(blocks: int, width: int) -> dict[str, tuple[int, int]]:
    layout = {"context_embedder": (width, 4096), "t_embedder.mlp.0": (width, 256), "t_embedder.mlp.2": (width, width),
              "y_embedder.mlp.0": (width, 2048), "y_embedder.mlp.2": (width, width),
              "final_layer.linear": (64, width), "final_layer.adaLN_modulation.1": (2 * width, width)}
    for i in range(blocks):
        for stream in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{stream}."
            layout.update({p + "attn.qkv": (3 * width, width), p + "attn.proj": (width, width),
                           p + "mlp.fc1": (4 * width, width), p + "mlp.fc2": (width, 4 * width),
                           p + "adaLN_modulation.1": (6 * width, width)})
    return layout


def diffusers_lora(layout: dict[str, tuple[int, int]], rank: int, seed: int = 0):
    """A diffusers-layout LoRA (``transformer.<name>.lora_A/B``) on every Linear, and its pieces by target."""
    gen = torch.Generator().manual_seed(seed)
    file, pieces = {}, []
    for name, target in sorted(names.diffusers_names(set(layout)).items()):
        out, inp = layout[target.module]
        a = torch.randn(rank, inp, generator=gen) * 0.01
        b = torch.randn(out // target.parts, rank, generator=gen) * 0.01
        file[f"transformer.{name}.lora_A.weight"], file[f"transformer.{name}.lora_B.weight"] = a, b
        pieces.append((target, a, b))
    return file, pieces


def apply_overhead(blocks: int, rank: int, repeats: int, device: str) -> tuple[float, float, float]:
    layout = stability_layout(blocks, SD3_MEDIUM_WIDTH)
    weights = {n: torch.randn(s, device=device) * 0.02 for n, s in layout.items()}
    file, pieces = diffusers_lora(layout, rank)
    file = {k: v.to(device) for k, v in file.items()}
    pieces = [(t, a.to(device), b.to(device)) for t, a, b in pieces]

    def ours() -> None:
        norm = keys.normalise(file, {"unet": layout})
        deltas.merge(weights, {m: w for (_, m), w in norm.modules.items()}, 0.8)

    def bare() -> None:
        for target, a, b in pieces:
            w = weights[target.module]
            rows = deltas.rows_of(target, w.shape[0])
            delta = b @ a
            w[rows].add_(deltas.swap_halves(delta) if target.swap else delta, alpha=0.8)

    times: dict[str, list[float]] = {"ours": [], "bare": []}
    with torch.no_grad():
        for fn in (ours, bare):  # warm-up
            fn()
        for _ in range(repeats):
            for label, fn in (("ours", ours), ("bare", bare)):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[label].append(time.perf_counter() - start)
    t_ours, t_bare = min(times["ours"]), min(times["bare"])
    return t_ours / t_bare, t_ours, t_bare


def quantized_overhead(rank: int, repeats: int, device: str, width: int, depth: int) -> tuple[float, float, float]:
    from a1111.mmdit import TinyMMDiT

    from lib_sd3.mixdq.qlinear import QuantLinear

    torch.manual_seed(0)
    model = TinyMMDiT(depth=depth, dim=width, heads=width // 64, channels=16, adm=2048, context_dim=4096).to(device).eval()
    layout = keys.layout_of(model)
    file, _ = diffusers_lora({n: s for n, s in layout.items() if len(s) == 2}, rank)
    norm = keys.normalise(file, {"unet": layout})
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.startswith("joint_blocks."):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QuantLinear.from_linear(module, 8, "dynamic"))
    x = torch.randn(1, 16, 64, 64, device=device)  # a 512 px latent: 1024 image tokens
    t, y, ctx = torch.tensor([500.0], device=device), torch.randn(1, 2048, device=device), torch.randn(1, 154, 4096, device=device)

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(x, t, y, ctx)
        _sync(device)
        return time.perf_counter() - start

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}

    def attach() -> None:
        for name, module in quantized.items():
            params = norm.modules[("unet", name)]
            term = sidepath.Term(params[deltas.LORA_UP].float(), params[deltas.LORA_DOWN].float(), 0.8 * deltas.scale(params))
            sidepath.attach(module, lambda _m: 1, lambda _m, term=term: [term])

    def detach() -> None:
        for module in quantized.values():
            sidepath.detach(module)

    step()
    plain, with_lora = [], []
    for _ in range(repeats):
        detach()
        plain.append(step())
        attach()
        with_lora.append(step())
    detach()
    t_plain, t_lora = min(plain), min(with_lora)
    return t_lora / t_plain, t_lora, t_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=2, help="joint blocks at SD3 Medium width for apply_overhead")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--q-width", type=int, default=768, help="MMDiT width of the W8A8 step")
    parser.add_argument("--q-depth", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    err, ok, total = oracle()
    ratio, t_ours, t_bare = apply_overhead(args.blocks, args.rank, args.repeats, args.device)
    print(f"# apply rank-{args.rank} diffusers LoRA, {args.blocks} blocks at width {SD3_MEDIUM_WIDTH} on {args.device}: "
          f"ours {t_ours * 1e3:.1f} ms, bare merge {t_bare * 1e3:.1f} ms")
    q_ratio, t_lora, t_plain = quantized_overhead(args.rank, args.repeats, args.device, args.q_width, args.q_depth)
    print(f"# W8A8 step (width {args.q_width}, depth {args.q_depth}, 1024+154 tokens) on {args.device}: "
          f"with LoRA {t_lora * 1e3:.1f} ms, without {t_plain * 1e3:.1f} ms")
    print(f"max_abs_err={err:.3g} formats_ok={ok}/{total} apply_overhead={ratio:.3f} "
          f"quantized_lora_overhead={q_ratio:.3f}")


if __name__ == "__main__":
    main()
