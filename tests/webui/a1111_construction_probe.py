"""A1111's own SD3 construction vs ours on the tiny SD3 / SD3.5 checkpoints. Runs INSIDE A1111's venv.

    <A1111 venv python> tests/webui/a1111_construction_probe.py --webui ROOT --assets DIR

Builds each checkpoint with A1111's ``sd3_impls.BaseModel`` and loads it the way ``load_model_weights``
does (``load_state_dict(strict=False)``), builds it with the extension's MMDiT (``tests/tiny_sd35.load_mmdit``),
runs both on one input and prints, per file, A1111's load error (if any), the keys it left unused / unfilled, and the
largest output difference. No A1111 patch is involved: this is A1111 without the extension.

On SD3 Medium it also says whether the two outputs are equal bit for bit in fp32 and bf16, and times
one sampling step of both MMDiTs on a depth-8 SD3 Medium file with random weights, at a step's shapes:
batch 2 (a CFG pair), a 64x64 latent, 154 text tokens. ``--step-repeats`` rounds, each calling both
back to back (the order alternates); the ratio is the median of the rounds' ours / A1111 ratios, with
their interquartile range, the ratio of the median times and the ratio of median process CPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("sd3-tiny", "sd35-large-tiny", "sd35-medium-tiny")
PREFIX = "model."  # SD3Inferencer.model is the BaseModel: "model.diffusion_model.*" -> "diffusion_model.*"
STEP_DEPTH, STEP_LATENT, STEP_CONTEXT_TOKENS, STEP_BATCH = 8, 64, 154, 2


def step_timing(tmp: Path, repeats: int) -> dict:
    """A1111's SD3 Medium MMDiT and ours on one depth-8 file: median step times and bit-identity."""
    import build_assets
    import torch
    from modules.models.sd3.sd3_impls import BaseModel
    from safetensors.torch import save_file

    from lib_sd3.models.families import MMDiTConfig
    from lib_sd3.models.mmdit import MMDiT
    from tests.tiny_sd35 import load_mmdit

    config = MMDiTConfig(depth=STEP_DEPTH, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=48,
                         context_dim=build_assets.CONTEXT_WIDTH, adm_dim=build_assets.ADM_IN_CHANNELS)
    generator = torch.Generator().manual_seed(11)
    state = {"model.diffusion_model." + k: torch.randn(v.shape, generator=generator) * (0.5 / v.shape[-1] ** 0.5)
             for k, v in MMDiT(config, device="meta").state_dict().items()}
    path = tmp / "sd3-step.safetensors"
    save_file(state, str(path))
    _, ours = load_mmdit(path)
    a1111 = BaseModel(shift=3.0, device="cpu", dtype=torch.float32, state_dict=state, prefix="model.diffusion_model.")
    a1111 = a1111.diffusion_model.eval()
    a1111.load_state_dict({k[len("model.diffusion_model."):]: v for k, v in state.items()}, strict=True)
    x = torch.randn(STEP_BATCH, 16, STEP_LATENT, STEP_LATENT, generator=generator)
    context = torch.randn(STEP_BATCH, STEP_CONTEXT_TOKENS, build_assets.CONTEXT_WIDTH, generator=generator)
    y = torch.randn(STEP_BATCH, build_assets.ADM_IN_CHANNELS, generator=generator)
    t = torch.full((STEP_BATCH,), 500.0)
    wall: dict[str, list[float]] = {"ours": [], "a1111": []}
    cpu: dict[str, list[float]] = {"ours": [], "a1111": []}
    with torch.inference_mode():
        identical = torch.equal(ours(x, t, y=y, context=context), a1111(x, t, y=y, context=context))  # + warm-up
        for round_ in range(repeats):
            order = (("ours", ours), ("a1111", a1111))
            for name, model in order if round_ % 2 == 0 else order[::-1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                model(x, t, y=y, context=context)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    # each round's two calls ran back to back, so a round's ratio is what a shared machine disturbs least
    paired = sorted(o / a for o, a in zip(wall["ours"], wall["a1111"], strict=True))
    quartile = len(paired) // 4
    return {"bit_identical_fp32": identical, "ratio": statistics.median(paired),
            "ratio_iqr": [paired[quartile], paired[-1 - quartile]],
            "ratio_of_medians": statistics.median(wall["ours"]) / statistics.median(wall["a1111"]),
            "cpu_ratio": statistics.median(cpu["ours"]) / statistics.median(cpu["a1111"]),
            "ours_s": statistics.median(wall["ours"]), "a1111_s": statistics.median(wall["a1111"]),
            "threads": torch.get_num_threads(), "repeats": repeats}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--webui", required=True, type=Path)
    parser.add_argument("--assets", required=True, type=Path)
    parser.add_argument("--step-repeats", type=int, default=0, help="time a step this many rounds (0: do not)")
    parser.add_argument("--tmp", type=Path, help="where the step-timing file is written")
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
                entry["bit_identical_fp32"] = torch.equal(got, expected)
                ours_bf16, a1111_bf16 = ours.to(torch.bfloat16), a1111.diffusion_model.to(torch.bfloat16)
                args_bf16 = (x.bfloat16(), t)
                entry["bit_identical_bf16"] = torch.equal(
                    ours_bf16(*args_bf16, y=y.bfloat16(), context=context.bfloat16()),
                    a1111_bf16(*args_bf16, y=y.bfloat16(), context=context.bfloat16()))
            except Exception as error:  # what a user of A1111 without the extension gets
                entry["a1111_error"] = f"{type(error).__name__}: {str(error)[:400]}"
        report[name] = entry
    if args.step_repeats:
        report["sd3_step"] = step_timing(args.tmp or args.assets, args.step_repeats)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
