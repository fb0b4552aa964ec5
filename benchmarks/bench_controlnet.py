"""SD3.5 ControlNet: parity with diffusers, the cost of the hook, and the memory of loading.

- ``max_abs_err``: largest |ours - oracle| over sigmas, batch 1 and a CFG batch, strengths and skipped
  layers, for the denoised output D = x - sigma v of the tiny SD3.5-Large-shaped base with a ControlNet
  (released key layout, loaded by ``lib_sd3.controlnet.load``) against Stability's residual rule run on
  diffusers' SD3Transformer2DModel + SD3ControlNetModel modules (tests/tiny_controlnet.py), and for each
  ControlNet block's output against diffusers' SD3ControlNetModel. fp32, CPU. Goal: <= 1e-4.
- ``call_overhead``: time of our base call with the ControlNet attached (``lib_sd3.controlnet.control.
  controlling``) over a bare base call plus a bare ControlNet forward on the same shapes, plain torch; the
  three are timed back to back in each round and the median of the rounds' ratios is reported (robust to
  the load of a shared machine drifting between rounds). Goal: <= 1.05.
- ``load_peak_ratio``: peak RSS added while ``load_controlnet`` loads an fp32 file into fp16, over the
  model's fp16 size, measured in a fresh subprocess (peak counter reset through /proc/self/clear_refs).
  Goal: <= 1.3 (the fp32 file converted whole first would be ~3; its scratch buffer here is ~5 % of the model).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from lib_sd3.controlnet.control import ControlStack, ControlUnit, controlling  # noqa: E402
from lib_sd3.controlnet.detect import ControlNetConfig  # noqa: E402
from lib_sd3.controlnet.load import load_controlnet  # noqa: E402
from lib_sd3.controlnet.model import ControlNet  # noqa: E402
from lib_sd3.models.families import MMDiTConfig  # noqa: E402
from lib_sd3.models.mmdit import MMDiT  # noqa: E402
from lib_sd3.sampling.slg import skip_blocks  # noqa: E402
from tests import tiny_controlnet, tiny_sd35  # noqa: E402

SIGMAS = (0.999, 0.75, 0.4, 0.05)
SKIPS = ((), (1,), (0, 1), (3,))
STRENGTHS = (1.0, 0.5)
# call overhead: an SD3.5-Large-like ratio (2 joint blocks per ControlNet block) at 512 wide, 32x32 latent
SPEED_BASE_DEPTH, SPEED_CONTROL_DEPTH, SPEED_LATENT, SPEED_ROUNDS = 8, 4, 32, 15
# load peak: 768 wide, 8 blocks: ~90 M parameters, ~360 MB in fp32, ~180 MB in fp16
LOAD_CONFIG = ControlNetConfig(depth=8, hidden_size=768, patch_size=2, in_channels=16, pooled_dim=2048)


def _parity(folder: Path) -> float:
    ref_base = tiny_controlnet.write_base(folder / "base.safetensors")
    ref_cn = tiny_controlnet.write_controlnet(folder / "canny.safetensors")
    _, base = tiny_sd35.load_mmdit(folder / "base.safetensors")
    _, cn = load_controlnet(folder / "canny.safetensors")
    latent = tiny_controlnet.control_latent()
    x2, context2, pooled2 = tiny_sd35.inputs(seed=3, batch=2)
    worst = 0.0
    with torch.no_grad():
        for x, context, pooled in ((x2[:1], context2[:1], pooled2[:1]), (torch.cat([x2[:1]] * 2), context2, pooled2)):
            for sigma in SIGMAS:
                t = torch.full((x.shape[0],), 1000 * sigma)
                tokens = base.x_embedder(x) + base.cropped_pos_embed(tuple(x.shape[-2:]))
                got = cn(tokens, latent.expand(x.shape[0], -1, -1, -1), t, pooled)
                expected = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, latent)
                worst = max(worst, *((a - b).abs().max().item() for a, b in zip(got, expected, strict=True)))
                for strength in STRENGTHS:
                    hidden = tiny_controlnet.reference_hidden(ref_base, ref_cn, x, t, pooled, latent, strength)
                    for skip in SKIPS:
                        v = tiny_controlnet.reference_velocity(ref_base, x, t, context, pooled, hidden, skip)
                        stack = ControlStack([ControlUnit(cn, latent, strength)])
                        with skip_blocks(base, skip), controlling(base, stack, 0, 1):
                            ours = base(x, t, y=pooled, context=context)
                        worst = max(worst, ((x - ours * sigma) - (x - v * sigma)).abs().max().item())
    return worst


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _call_overhead() -> tuple[float, float, float, float]:
    torch.manual_seed(0)
    config = MMDiTConfig(depth=SPEED_BASE_DEPTH, patch_size=2, in_channels=16, out_channels=16,
                         pos_embed_max_size=32, context_dim=256, adm_dim=2048, qk_norm="rms")
    base = MMDiT(config).eval()
    cn = ControlNet(ControlNetConfig(depth=SPEED_CONTROL_DEPTH, hidden_size=config.hidden_size, patch_size=2,
                                     in_channels=16, pooled_dim=2048)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, SPEED_LATENT, SPEED_LATENT, generator=g)
    context, pooled = torch.randn(2, 77, 256, generator=g), torch.randn(2, 2048, generator=g)
    t = torch.full((2,), 600.0)
    latent = torch.randn(1, 16, SPEED_LATENT, SPEED_LATENT, generator=g)
    stack = ControlStack([ControlUnit(cn, latent, 1.0)])
    tokens = base.x_embedder(x) + base.cropped_pos_embed((SPEED_LATENT, SPEED_LATENT))
    expanded = latent.expand(2, -1, -1, -1)

    def controlled():
        with controlling(base, stack, 0, 1):
            base(x, t, y=pooled, context=context)

    ours, bare, net = [], [], []
    with torch.no_grad():
        controlled(), base(x, t, y=pooled, context=context), cn(tokens, expanded, t, pooled)  # warm up
        for _ in range(SPEED_ROUNDS):  # interleaved, so drift from other load hits all three alike
            ours.append(_seconds(controlled))
            bare.append(_seconds(lambda: base(x, t, y=pooled, context=context)))
            net.append(_seconds(lambda: cn(tokens, expanded, t, pooled)))
    ratios = [o / (b + n) for o, b, n in zip(ours, bare, net, strict=True)]  # each round's three, close in time
    return statistics.median(ratios), statistics.median(ours), statistics.median(bare), statistics.median(net)


LOAD_CHILD = """
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[2])
from lib_sd3.controlnet.load import load_controlnet

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS counter
before = rss("VmRSS:")
start = time.perf_counter()
_, model = load_controlnet(sys.argv[1], dtype=torch.float16)
seconds = time.perf_counter() - start
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"added": rss("VmHWM:") - before, "size": size, "seconds": seconds}))
"""


def _load_peak(folder: Path) -> tuple[float, int, int, float]:
    from safetensors.torch import save_file

    path = folder / "load.safetensors"
    model = ControlNet(LOAD_CONFIG)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["control_type"] = torch.tensor([2], dtype=torch.int32)
    state["pos_embed.proj.weight"] = torch.zeros(LOAD_CONFIG.hidden_size, 16, 2, 2)
    state["pos_embed.proj.bias"] = torch.zeros(LOAD_CONFIG.hidden_size)
    save_file(state, str(path))
    del model, state
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(path), str(ROOT)], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["added"] / result["size"], result["added"], result["size"], result["seconds"]


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        err = _parity(folder)
        ratio, added, size, seconds = _load_peak(folder)
    overhead, ours, bare, net = _call_overhead()
    print(f"parity over sigmas {SIGMAS}, strengths {STRENGTHS}, skipped blocks {SKIPS}, batch 1 and CFG 2: {err:.3g}")
    print(f"call ({SPEED_BASE_DEPTH} joint + {SPEED_CONTROL_DEPTH} ControlNet blocks, {SPEED_LATENT}x{SPEED_LATENT} "
          f"latent, batch 2, fp32, 1 thread): with ControlNet {ours * 1000:.1f} ms, bare base {bare * 1000:.1f} ms "
          f"+ bare ControlNet {net * 1000:.1f} ms")
    print(f"load fp32 file -> fp16: {added / 2**20:.1f} MiB added at peak for a {size / 2**20:.1f} MiB model, "
          f"{seconds:.2f} s")
    print(f"max_abs_err={err:.3g} call_overhead={overhead:.3f} load_peak_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
