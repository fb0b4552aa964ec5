"""``python -m lib_sd3.mixdq calibrate ...``: write a MixDQ bit config measured on your model.

    python -m lib_sd3.mixdq calibrate --diffusers /path/to/stable-diffusion-3-medium-diffusers \\
        --budget-ratio 0.33 --out my_w4a8.yaml
    python -m lib_sd3.mixdq calibrate --tiny --budget-ratio 0.4 --out /tmp/tiny.yaml   # smoke test, CPU

The prompts are the shipped ``prompts.txt`` (or ``--prompts FILE``, one per line); each is run
for ``--steps`` steps of a flow-matching Euler sampler with the float model, and every step's
transformer input becomes a calibration sample. ``--tiny`` uses a small random transformer and
pseudo text embeddings (a prompt-seeded sequence with an outsized first "BOS" token): it checks
the machinery, it does not produce a config for a real model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from lib_sd3.mixdq import calibrate as cal
from lib_sd3.mixdq import config as cfg
from lib_sd3.mixdq.model import module_bytes

TINY_CONFIG = {"sample_size": 16, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 32,
               "num_attention_heads": 2, "joint_attention_dim": 64, "caption_projection_dim": 64,
               "pooled_projection_dim": 64, "out_channels": 4, "pos_embed_max_size": 16}
TINY_TOKENS = 12
TINY_LATENT = 8  # latent pixels per side
BOS_GAIN = 30.0
A1111_T5_TOKENS = 77  # A1111 pads/cuts T5 to 77 tokens: 154 text tokens in all, as at inference there  # CLIP's BOS hidden state is tens of times larger than the other tokens'


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def flow_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """SD3's shifted flow levels s(t) = m t / (1 + (m - 1) t) at t = 1, ..., 1/steps."""
    ts = [1 - i / steps for i in range(steps)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


def tiny_model(seed: int = 0) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_CONFIG).eval()


def tiny_samples(prompts: list[str], steps: int) -> list[dict[str, torch.Tensor]]:
    """Prompt-seeded stand-ins for encoded prompts, at every level of a ``steps``-step schedule."""
    samples = []
    for prompt in prompts:
        g = torch.Generator().manual_seed(_seed(prompt))
        context = torch.randn(1, TINY_TOKENS, TINY_CONFIG["joint_attention_dim"], generator=g)
        context[:, 0] *= BOS_GAIN
        pooled = torch.randn(1, TINY_CONFIG["pooled_projection_dim"], generator=g)
        shape = (1, TINY_CONFIG["in_channels"], TINY_LATENT, TINY_LATENT)
        clean, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        for s in flow_sigmas(steps):
            samples.append({"x": (1 - s) * clean + s * noise, "sigma": torch.tensor(s),
                            "timestep": torch.tensor([1000 * s]), "context": context, "pooled": pooled})
    return samples


def diffusers_samples(path: str, prompts: list[str], steps: int, size: int, device: str, dtype: torch.dtype):
    """Encode the prompts with a local SD3 diffusers pipeline and record a short Euler trajectory each."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    model = pipe.transformer.eval()
    forward = cal.denoised_forward(model)
    latent = size // pipe.vae_scale_factor
    samples = []
    with torch.no_grad():
        for prompt in prompts:
            context, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device=device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=A1111_T5_TOKENS)
            g = torch.Generator(device="cpu").manual_seed(_seed(prompt))
            x = torch.randn(1, model.config.in_channels, latent, latent, generator=g).to(device, dtype)
            levels = [*flow_sigmas(steps, pipe.scheduler.config.get("shift", 3.0)), 0.0]
            for s, s_next in zip(levels[:-1], levels[1:], strict=True):
                sample = {"x": x, "sigma": torch.tensor(s, device=device, dtype=dtype),
                          "timestep": torch.tensor([1000 * s], device=device, dtype=dtype),
                          "context": context, "pooled": pooled}
                samples.append(sample)
                denoised = forward(model, sample)
                x = denoised + (s_next / s) * (x - denoised)  # Euler step of dx/ds = (x - D) / s
    return model, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_sd3.mixdq", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="measure sensitivity and solve a bit allocation for a memory budget")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", metavar="PATH", help="local StableDiffusion3Pipeline folder")
    source.add_argument("--tiny", action="store_true", help="a small random transformer (smoke test)")
    budget = c.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ratio", type=float, help="quantized size / current size of the transformer")
    budget.add_argument("--budget-mb", type=float, help="quantized transformer size in MiB")
    c.add_argument("--out", required=True, help="YAML config to write")
    c.add_argument("--prompts", help="prompt file, one per line (default: the shipped prompts.txt)")
    c.add_argument("--max-prompts", type=int, default=4)
    c.add_argument("--steps", type=int, default=4, help="sampler steps per prompt (each step is one sample)")
    c.add_argument("--size", type=int, default=512, help="image size in pixels (diffusers)")
    c.add_argument("--content-weight", type=float, default=1.0, help="MixDQ's K: weight of content vs quality")
    c.add_argument("--protect-fraction", type=float, default=0.02)
    c.add_argument("--act-mode", choices=("dynamic", "static"), default="dynamic")
    c.add_argument("--group-size", type=int, default=cal.DEFAULT_GROUP_SIZE, help="input channels per int4 scale")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    prompts = cal.read_prompts(Path(args.prompts) if args.prompts else cal.PROMPTS_FILE)[: args.max_prompts]
    if args.tiny:
        model, samples = tiny_model(), tiny_samples(prompts, args.steps)
    else:
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        model, samples = diffusers_samples(args.diffusers, prompts, args.steps, args.size, args.device, dtype)
    size = module_bytes(model)
    budget = int(args.budget_ratio * size) if args.budget_ratio is not None else int(args.budget_mb * 2**20)
    config, report = cal.calibrate(model, samples, cal.denoised_forward(model), budget, args.content_weight,
                                   args.protect_fraction, args.act_mode, args.group_size, name=Path(args.out).stem)
    cfg.save(config, args.out)
    summary = {k: report[k] for k in ("budget_bytes", "predicted_bytes", "fixed_bytes", "layers", "bits")}
    print(json.dumps({"out": args.out, "model_bytes": size, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
