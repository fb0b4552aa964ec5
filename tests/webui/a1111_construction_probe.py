"""A1111's own SD3 construction vs ours on the tiny SD3 / SD3.5 checkpoints. Runs INSIDE A1111's venv.

    <A1111 venv python> tests/webui/a1111_construction_probe.py --webui ROOT --assets DIR

Builds each checkpoint with A1111's ``sd3_impls.BaseModel`` and loads it the way ``load_model_weights``
does (``load_state_dict(strict=False)``), builds it with the extension's MMDiT (``tests/tiny_sd35.load_mmdit``),
runs both on one input and prints, per file, A1111's load error (if any), the keys it left unused / unfilled, and the
largest output difference. No A1111 patch is involved: this is A1111 without the extension.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("sd3-tiny", "sd35-large-tiny", "sd35-medium-tiny")
PREFIX = "model."  # SD3Inferencer.model is the BaseModel: "model.diffusion_model.*" -> "diffusion_model.*"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--webui", required=True, type=Path)
    parser.add_argument("--assets", required=True, type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.webui.resolve()))
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent.parent))
    os.chdir(args.webui)
    import build_assets

    build_assets._stub_sd_hijack()
    import torch
    from modules.models.sd3.sd3_impls import BaseModel
    from safetensors.torch import load_file

    from tests.tiny_sd35 import load_mmdit

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 8, 8, generator=generator)
    context = torch.randn(1, 5, build_assets.CONTEXT_WIDTH, generator=generator)
    y = torch.randn(1, build_assets.ADM_IN_CHANNELS, generator=generator)
    t = torch.tensor([700.0])
    report = {}
    for name in FILES:
        path = args.assets / "Stable-diffusion" / f"{name}.safetensors"
        state = {k: v.float() for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}
        entry: dict = {"a1111_error": None}
        _, ours = load_mmdit(path)
        with torch.no_grad():
            expected = ours(x, t, y=y, context=context)
            try:
                a1111 = BaseModel(shift=3.0, device="cpu", dtype=torch.float32, state_dict=state,
                                  prefix="model.diffusion_model.")
                result = a1111.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, strict=False)
                entry["unused"] = sorted(result.unexpected_keys)
                entry["unfilled"] = sorted(k for k in result.missing_keys if k.startswith("diffusion_model."))
                got = a1111.diffusion_model(x, t, y=y, context=context)
                entry["max_abs_diff"] = float((got - expected).abs().max())
                entry["output_scale"] = float(expected.abs().max())
            except Exception as error:  # what a user of A1111 without the extension gets
                entry["a1111_error"] = f"{type(error).__name__}: {str(error)[:400]}"
        report[name] = entry
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
