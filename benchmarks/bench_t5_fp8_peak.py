"""Peak resident memory while fp8 T5 is made from an fp16 file: mapped file (before) vs one tensor at a time (now).

A reduced T5 encoder with T5-XXL's real key layout (24 blocks, gated-GELU, relative attention bias in
block 0, vocab 32128; d_model / d_ff reduced, default 1024 / 2816) is written as an fp16 safetensors
file, then loaded as fp8 (Linear weights float8_e4m3fn, the rest in the model's fp32, as A1111's T5
holds them) in a fresh process each way, side by side:

- ``mapped``: what the extension did before: ``safetensors.safe_open`` (the file mapped) feeding
  :func:`lib_sd3.t5.load_keeping_dtypes` one key at a time; every page it touched stays resident;
- ``layered``: now: :func:`lib_sd3.t5.read_t5_state` reads each tensor into its own buffer (plain
  reads, no mapping), converts it, drops the fp16 copy.

Peak = the process's VmHWM minus its VmRSS just before loading (imports and the meta model excluded).
``extra`` = peak minus what stays resident (the fp8 model): the cost of converting. For T5-XXL the
same code keeps that extra at about one fp16 tensor plus the file's largest fp32 copy (the embedding:
32128 x 4096); the last line's ``xxl_peak_gb`` adds the measured ratio of extra to the largest tensor
to T5-XXL's own resident fp8 size. Last line: key=value pairs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

XXL = {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "num_layers": 24, "vocab_size": 32128}

CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
import torch
from transformers import T5Config, T5EncoderModel
from lib_sd3 import t5

def rss(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

config = T5Config(**{config!r}, feed_forward_proj="gated-gelu", dropout_rate=0.0, d_kv={config}["d_model"] // {config}["num_heads"])
with torch.device("meta"):
    model = T5EncoderModel(config)
model._keep_in_fp32_modules = []  # A1111's T5 keeps no layer wide: every Linear in fp8
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM to the current RSS
before = rss("VmRSS")
if {way!r} == "mapped":
    import safetensors
    with safetensors.safe_open({path!r}, framework="pt") as handle:
        pairs = ((key, handle.get_tensor(key)) for key in handle.keys())
        t5.load_keeping_dtypes(model, pairs, fp8=True)
        peak = rss("VmHWM")
else:
    t5.load_keeping_dtypes(model, t5.read_t5_state({path!r}), fp8=True)
    peak = rss("VmHWM")
resident = t5.parameter_bytes(model)
assert {{p.dtype for n, p in model.named_parameters() if n.endswith("q.weight")}} == {{torch.float8_e4m3fn}}
print(json.dumps({{"peak": peak - before, "resident": resident}}))
"""


def write_fp16_file(path: Path, config: dict) -> tuple[int, int]:
    """A random fp16 T5 encoder file in the real layout; returns (file bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    from lib_sd3.t5.file_check import encoder_layout

    torch.manual_seed(0)
    tensors = {key: (torch.randn(shape) * 0.05).to(torch.float16) for key, shape in encoder_layout(config).items()}
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"].clone()  # the published file holds both
    save_file(tensors, str(path))
    return path.stat().st_size, max(t.numel() * 2 for t in tensors.values())


def measure(way: str, path: Path, config: dict) -> dict:
    code = CHILD.format(root=str(ROOT), config=config, way=way, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    args = parser.parse_args()
    config = {"d_model": args.d_model, "d_ff": args.d_ff, "num_heads": args.heads, "num_layers": 24,
              "vocab_size": 32128}
    from lib_sd3 import t5

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t5xxl_fp16.safetensors"
        file_bytes, largest = write_fp16_file(path, config)
        mapped, layered = measure("mapped", path, config), measure("layered", path, config)
    resident = layered["resident"]
    extra = layered["peak"] - resident
    # T5-XXL: its embedding (32128 x 4096) is the largest tensor: read in fp16, kept in fp32.
    xxl_largest = XXL["vocab_size"] * XXL["d_model"] * 2
    xxl_peak = t5.RESIDENT_BYTES["fp8"] + max(extra, 0) / largest * xxl_largest
    gb = 1e9
    print(f"reduced T5, real layout {config}: fp16 file {file_bytes / gb:.3f} GB, largest tensor "
          f"{largest / gb:.3f} GB (fp16), fp8 model resident {resident / gb:.3f} GB")
    print(f"mapped (safe_open, before): peak {mapped['peak'] / gb:.3f} GB = resident + {(mapped['peak'] - resident) / gb:.3f} GB")
    print(f"layered (read_t5_state, now): peak {layered['peak'] / gb:.3f} GB = resident + {extra / gb:.3f} GB "
          f"({extra / largest:.2f} x the largest fp16 tensor)")
    print(f"T5-XXL scaled: fp8 resident {t5.RESIDENT_BYTES['fp8'] / gb:.2f} GB + {extra / largest:.2f} x "
          f"{xxl_largest / gb:.3f} GB = {xxl_peak / gb:.2f} GB peak (the mapped way adds up to the 9.79 GB file)")
    print(f"peak_mapped_gb={mapped['peak'] / gb:.3f} peak_layered_gb={layered['peak'] / gb:.3f} "
          f"resident_gb={resident / gb:.3f} fp16_file_gb={file_bytes / gb:.3f} "
          f"extra_over_largest={extra / largest:.2f} xxl_peak_gb={xxl_peak / gb:.2f}")


if __name__ == "__main__":
    main()
