"""SD3.5 parity with diffusers, skip-layer parity, and the cost of our detect + build + load path.

- ``large_max_abs_err`` / ``medium_max_abs_err``: largest |ours - diffusers| over several timesteps for
  a random SD3.5-Large-shaped (qk-norm) and SD3.5-Medium-shaped (qk-norm + MMDiT-X) transformer,
  written under Stability's key names by ``lib_sd3.mmdit_keys`` and loaded by ``lib_sd3.mmdit_load``
  (fp32). ``slg_max_abs_err``: the same with joint blocks skipped (diffusers' ``skip_layers`` against
  ``lib_sd3.slg.skip_blocks``), both shapes.
- ``load_overhead``: median time of ``load_mmdit`` (header-only family detection, build on the meta
  device, load) on an SD3.5-Medium-shaped file, over the median of the floor: a bare
  ``safetensors.torch.load_file`` + ``load_state_dict`` into the same already-built module. Measured
  interleaved in one run. Goal (issue 14): <= 1.10.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from lib_sd3.mmdit_load import load_mmdit  # noqa: E402
from lib_sd3.slg import skip_blocks  # noqa: E402
from tests import tiny_sd35  # noqa: E402

TIMESTEPS = (999.0, 750.0, 500.0, 250.0, 30.0)
SKIPS = ([1], [0, 1], [2])
LOAD_DEPTH = 6  # 384 wide, ~36 M parameters: ~145 MB in fp32
LOAD_ROUNDS = 7


def _parity(family: str, folder: Path) -> tuple[float, float]:
    path = folder / f"{family}.safetensors"
    reference = tiny_sd35.write_checkpoint(path, family)
    _, ours = load_mmdit(path)
    x, context, pooled = tiny_sd35.inputs()
    plain, skipped = 0.0, 0.0
    with torch.no_grad():
        for t in TIMESTEPS:
            timestep = torch.full((x.shape[0],), t)
            for skip in ([], *SKIPS):
                expected = reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                                     timestep=timestep, skip_layers=skip or None).sample
                with skip_blocks(ours, skip):
                    err = (ours(x, timestep, y=pooled, context=context) - expected).abs().max().item()
                if skip:
                    skipped = max(skipped, err)
                else:
                    plain = max(plain, err)
    return plain, skipped


def _load_overhead(folder: Path) -> tuple[float, float, float]:
    from safetensors.torch import load_file

    path = folder / "sd35m-load.safetensors"
    tiny_sd35.write_checkpoint(path, "sd3.5-medium", depth=LOAD_DEPTH)
    _, built = load_mmdit(path)
    prefix = "model.diffusion_model."
    ours, floor = [], []
    for _ in range(LOAD_ROUNDS):
        start = time.perf_counter()
        tensors = load_file(str(path))
        built.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True)
        floor.append(time.perf_counter() - start)
        del tensors
        start = time.perf_counter()
        _, model = load_mmdit(path)
        ours.append(time.perf_counter() - start)
        del model
    return statistics.median(ours) / statistics.median(floor), statistics.median(ours), statistics.median(floor)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        large, large_slg = _parity("sd3.5-large", folder)
        medium, medium_slg = _parity("sd3.5-medium", folder)
        overhead, ours_s, floor_s = _load_overhead(folder)
    print(f"parity over timesteps {TIMESTEPS}: SD3.5 Large {large:.3g}, SD3.5 Medium {medium:.3g}; "
          f"skipped blocks {SKIPS}: Large {large_slg:.3g}, Medium {medium_slg:.3g}")
    print(f"load of an SD3.5-Medium-shaped file (depth {LOAD_DEPTH}): ours {ours_s * 1000:.1f} ms, "
          f"bare load_file + load_state_dict {floor_s * 1000:.1f} ms")
    print(f"large_max_abs_err={large:.3g} medium_max_abs_err={medium:.3g} "
          f"slg_max_abs_err={max(large_slg, medium_slg):.3g} load_overhead={overhead:.3f}")


if __name__ == "__main__":
    main()
