"""SD3.5 parity with diffusers and skip-layer parity.

- ``large_max_abs_err`` / ``medium_max_abs_err``: largest |ours - diffusers| over several timesteps for
  a random SD3.5-Large-shaped (qk-norm) and SD3.5-Medium-shaped (qk-norm + MMDiT-X) transformer,
  written under Stability's key names with ``lib_sd3.models.mmdit_keys``' table and loaded into our MMDiT
  (fp32, ``tests/tiny_sd35.load_mmdit``). ``slg_max_abs_err``: the same with joint blocks skipped
  (diffusers' ``skip_layers`` against ``lib_sd3.sampling.slg.skip_blocks``), both shapes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from lib_sd3.sampling.slg import skip_blocks  # noqa: E402
from tests import tiny_sd35  # noqa: E402

TIMESTEPS = (999.0, 750.0, 500.0, 250.0, 30.0)
SKIPS = ([1], [0, 1], [2])


def _parity(family: str, folder: Path) -> tuple[float, float]:
    path = folder / f"{family}.safetensors"
    reference = tiny_sd35.write_checkpoint(path, family)
    _, ours = tiny_sd35.load_mmdit(path)
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


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        large, large_slg = _parity("sd3.5-large", folder)
        medium, medium_slg = _parity("sd3.5-medium", folder)
    print(f"parity over timesteps {TIMESTEPS}: SD3.5 Large {large:.3g}, SD3.5 Medium {medium:.3g}; "
          f"skipped blocks {SKIPS}: Large {large_slg:.3g}, Medium {medium_slg:.3g}")
    print(f"large_max_abs_err={large:.3g} medium_max_abs_err={medium:.3g} "
          f"slg_max_abs_err={max(large_slg, medium_slg):.3g}")


if __name__ == "__main__":
    main()
