"""fp8 T5 weights vs fp16, side by side: embedding error, resident weight memory, peak memory, time.

A T5 encoder (transformers' T5EncoderModel, random weights at T5's own initialisation scale) is
loaded twice from the same fp16 tensors with :func:`lib_sd3.t5.load_keeping_dtypes`: once keeping
fp16, once keeping Linear weights in float8_e4m3fn (upcast one layer at a time). transformers
keeps ``wo`` in full precision (``_keep_in_fp32_modules``); A1111's own T5 has no such rule, so
there every Linear is fp8, which is what the 4.89 GB fp8 file vs the 9.79 GB fp16 file shows.

Default: a small T5 on CPU (seconds). ``--xxl-width`` uses T5-XXL's width (d_model 4096, d_ff
10240, 64 heads) with ``--layers`` blocks, on CUDA when present. Last line: key=value pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import T5Config, T5EncoderModel  # noqa: E402

from lib_sd3 import t5  # noqa: E402


def build(config: T5Config, device: str) -> T5EncoderModel:
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--xxl-width", action="store_true")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.xxl_width:
        config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=args.layers, num_heads=64,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0)
    else:
        config = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=args.layers, num_heads=8,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    source = T5EncoderModel(config).eval()
    state = {k: v.to(torch.float16) for k, v in source.state_dict().items()}
    del source
    ids = torch.randint(0, config.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(1))

    results = {}
    for name, fp8 in (("fp16", False), ("fp8", True)):
        model = build(config, device)
        t5.load_keeping_dtypes(model, state, fp8=fp8)
        resident = t5.parameter_bytes(model)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            model.to(device)
            weights_on_device = torch.cuda.memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
        else:
            weights_on_device = resident
        inputs = ids.to(device)
        with torch.no_grad():
            model(input_ids=inputs)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = model(input_ids=inputs).last_hidden_state.float().cpu()
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
        results[name] = (out, resident, weights_on_device, elapsed, peak)
        del model
    ref, got = results["fp16"][0], results["fp8"][0]
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1)).min().item()
    relative = ((got - ref).norm() / ref.norm()).item()
    linear = sum(v.numel() for k, v in state.items() if v.dim() == 2 and "embed" not in k and "shared" not in k)
    print(f"T5 encoder d_model={config.d_model} d_ff={config.d_ff} layers={config.num_layers} on {device}; "
          f"{linear / 1e6:.0f} M Linear weights")
    for name, (_, resident, on_device, elapsed, peak) in results.items():
        peak_text = f", peak during encode {peak / 1e9:.3f} GB" if peak is not None else ""
        print(f"{name}: weights {resident / 1e9:.3f} GB (on {device}: {on_device / 1e9:.3f} GB){peak_text}, "
              f"encode {elapsed * 1e3:.1f} ms")
    ratio = results["fp8"][2] / results["fp16"][2]
    print(f"fp8 vs fp16 embeddings: min cosine {cosine:.5f}, relative error {relative:.4f}")
    # Derived, not measured: full T5-XXL (24 blocks) in A1111's layout, where every Linear is fp8 and
    # the token embedding (built without a dtype) is fp32.
    xxl_linear, xxl_embed = 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240), 32128 * 4096
    print(f"T5-XXL in A1111's layout (derived): fp16 {(xxl_linear * 2 + xxl_embed * 4) / 1e9:.2f} GB, "
          f"fp8 {(xxl_linear + xxl_embed * 4) / 1e9:.2f} GB (A1111 itself, fp32 on CPU: "
          f"{(xxl_linear + xxl_embed) * 4 / 1e9:.2f} GB); files {t5.RESIDENT_BYTES['fp16'] / 1e9:.2f} / "
          f"{t5.RESIDENT_BYTES['fp8'] / 1e9:.2f} GB")
    print(f"fp8_cosine={cosine:.5f} fp8_rel_error={relative:.4f} fp8_memory_ratio={ratio:.3f} "
          f"fp8_time_ratio={results['fp8'][3] / results['fp16'][3]:.3f} device={device}")


if __name__ == "__main__":
    main()
