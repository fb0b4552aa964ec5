"""SD3 LoRA in a real A1111 (issue 15), both states: every file layout applies through the built-in Lora extension.

One random rank-4 LoRA on every Linear of the tiny MMDiT is written in five layouts (kohya/Stability, diffusers,
peft, OneTrainer, LyCORIS LoKr) into ``models/Lora``. ``<lora:NAME:0.8>`` must change the image and give the
image of a checkpoint with the same LoRA merged offline (``W += 0.8 * scale * B A``), for every layout; the
Lora tab lists the files as SD3; a file of garbage keys costs one warning line and nothing else; with MixDQ
W8A8 on, the LoRA still applies (float side path beside the int8 layers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from webui_support import psnr, tracebacks_in, txt2img

from lib_sd3.lora import names

MMDIT = "model.diffusion_model."
RANK, ALPHA, STRENGTH = 4, 8.0, 0.8
MIN_PSNR_DB = 40.0
CHANGED_MAX_PSNR_DB = 30.0  # the LoRA must visibly change the picture
FORMATS = ("kohya", "diffusers", "peft", "onetrainer", "lycoris_lokr")


def _checkpoint(webui) -> Path:
    return webui.data_dir / "models" / "Stable-diffusion" / "sd3-tiny.safetensors"


def _pieces(weights: dict[str, torch.Tensor]) -> dict[str, tuple[names.Target, torch.Tensor, torch.Tensor]]:
    """diffusers module name -> (target, A, B) of a random LoRA on every Linear of the MMDiT."""
    stability = {k[len(MMDIT):-len(".weight")] for k, w in weights.items()
                 if k.startswith(MMDIT) and k.endswith(".weight") and w.dim() == 2}
    gen = torch.Generator().manual_seed(15)
    out = {}
    for name, target in sorted(names.diffusers_names(stability).items()):
        w = weights[MMDIT + target.module + ".weight"]
        rows = w.shape[0] // target.parts
        a = torch.randn(RANK, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        b = torch.randn(rows, RANK, generator=gen) * float(w.std()) * 0.4 * (w.shape[1] / RANK) ** 0.5
        out[name] = (target, a, b)
    return out


def _swap(t):
    h = t.shape[0] // 2
    return torch.cat((t[h:], t[:h]))


def _files(pieces) -> dict[str, dict[str, torch.Tensor]]:
    scale = ALPHA / RANK
    files: dict[str, dict[str, torch.Tensor]] = {f: {} for f in FORMATS}
    for name, (_target, a, b) in pieces.items():
        flat = name.replace(".", "_")
        files["diffusers"][f"transformer.{name}.lora_A.weight"] = a
        files["diffusers"][f"transformer.{name}.lora_B.weight"] = b * scale
        files["peft"][f"base_model.model.{name}.lora_A.weight"] = a
        files["peft"][f"base_model.model.{name}.lora_B.weight"] = b * scale
        ot = f"lora_transformer_{flat}"
        files["onetrainer"].update({f"{ot}.lora_down.weight": a, f"{ot}.lora_up.weight": b,
                                    f"{ot}.alpha": torch.tensor(ALPHA)})
        ly = f"lycoris_{flat}"
        files["lycoris_lokr"].update({f"{ly}.lokr_w1": torch.ones(1, 1), f"{ly}.lokr_w2_a": b, f"{ly}.lokr_w2_b": a,
                                      f"{ly}.alpha": torch.tensor(ALPHA)})
    by_module: dict[str, list] = {}
    for target, a, b in pieces.values():
        by_module.setdefault(target.module, []).append((target, a, b))
    for module, group in by_module.items():  # kohya: one LoRA per fused Stability layer
        group.sort(key=lambda t: t[0].part or 0)
        rows = sum(b.shape[0] for _, _, b in group)
        up = torch.zeros(rows, RANK * len(group))
        for i, (target, _, b) in enumerate(group):
            r0 = 0 if target.part is None else target.part * b.shape[0]
            up[r0:r0 + b.shape[0], i * RANK:(i + 1) * RANK] = b
        if group[0][0].swap:
            up = _swap(up)
        key = "lora_unet_" + module.replace(".", "_")
        files["kohya"].update({f"{key}.lora_down.weight": torch.cat([a for _, a, _ in group]),
                               f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA * len(group))})
    return files


def _merged(weights, pieces) -> dict[str, torch.Tensor]:
    merged = dict(weights)
    for target, a, b in pieces.values():
        key = MMDIT + target.module + ".weight"
        w = merged[key].clone() if merged[key] is weights[key] else merged[key]
        delta = STRENGTH * (ALPHA / RANK) * (b @ a)
        rows = slice(0, w.shape[0]) if target.part is None else slice(target.part * b.shape[0], (target.part + 1) * b.shape[0])
        w[rows] += _swap(delta) if target.swap else delta
        merged[key] = w
    return merged


@pytest.fixture(scope="module")
def loras(webui):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(_checkpoint(webui)))
    pieces = _pieces(weights)
    folder = webui.data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    for fmt, tensors in _files(pieces).items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"sd3lora_{fmt}.safetensors"))
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8), "random.key": torch.zeros(3),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4), "x.alpha": torch.tensor(1.0)},
              str(folder / "sd3lora_garbage.safetensors"))
    assert webui.post("/sdapi/v1/refresh-loras").status_code == 200
    # the merged checkpoint goes beside the base one (the data dir's Stable-diffusion folder is the asset cache)
    merged_path = _checkpoint(webui).resolve().parent / f"sd3-tiny-lora-merged-{os.getpid()}.safetensors"
    save_file(_merged(weights, pieces), str(merged_path))
    try:
        assert webui.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        merged_image, _, _ = txt2img(webui, sampler_name="Euler",
                                     override_settings={"sd_model_checkpoint": merged_path.stem},
                                     override_settings_restore_afterwards=True)
    finally:
        merged_path.unlink(missing_ok=True)
        webui.post("/sdapi/v1/refresh-checkpoints")
    base, _, _ = txt2img(webui, sampler_name="Euler")
    return {"merged": merged_image, "base": base}


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_equals_offline_merge(webui, loras, fmt):
    image, info, log = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:sd3lora_{fmt}:{STRENGTH}>")
    to_merged, to_base = psnr(image, loras["merged"]), psnr(image, loras["base"])
    print(f"\n[{webui.state}] {fmt}: PSNR vs offline merge {to_merged:.1f} dB, vs no LoRA {to_base:.1f} dB")
    assert not tracebacks_in(log), tracebacks_in(log)
    assert psnr(loras["base"], loras["merged"]) <= CHANGED_MAX_PSNR_DB, "the test LoRA is too weak to see"
    assert to_base <= CHANGED_MAX_PSNR_DB, f"{fmt}: the LoRA did not change the image"
    assert to_merged >= MIN_PSNR_DB, f"{fmt}: {to_merged:.1f} dB from the offline merge"
    report = webui.status()["features"]["LoRA"]["loras"][f"sd3lora_{fmt}"]
    assert report["unmatched"] == 0, report


def test_lora_tab_lists_sd3_loras_as_sd3(webui, loras):
    response = webui.get("/sd3-test/lora-cards")
    assert response.status_code == 200, response.text
    cards = {card["name"]: card["sd_version"] for card in response.json()}
    for fmt in FORMATS:
        assert cards.get(f"sd3lora_{fmt}") == "SD3", cards


def test_garbage_keys_one_line_and_http_200(webui, loras):
    image, _, log = txt2img(webui, sampler_name="Euler", prompt="a cat <lora:sd3lora_garbage:1>")
    lines = [line for line in log.splitlines() if "sd3lora_garbage" in line and "keys not applied" in line]
    assert len(lines) == 1, log[-3000:]
    assert not tracebacks_in(log), tracebacks_in(log)
    assert np.array_equal(image, loras["base"])
    report = webui.status()["features"]["LoRA"]["loras"]["sd3lora_garbage"]
    assert report["unmatched"] == 4 and report["modules"] == 0, report


def test_lora_on_mixdq_w8a8(webui, loras):
    if webui.sd3_route("GET", "/sd3/mixdq").status_code != 200:
        pytest.skip("MixDQ is not in this build")
    on = webui.post("/sd3/mixdq", {"config": "w8a8"})
    assert on.status_code == 200, on.text
    try:
        base_q, _, _ = txt2img(webui, sampler_name="Euler")
        lora_q, _, log = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:sd3lora_kohya:{STRENGTH}>")
        status = webui.status()["features"]["LoRA"]
    finally:
        assert webui.post("/sd3/mixdq", {"config": "off"}).status_code == 200
    print(f"\n[{webui.state}] W8A8: LoRA vs offline merge {psnr(lora_q, loras['merged']):.1f} dB, "
          f"no-LoRA W8A8 vs float {psnr(base_q, loras['base']):.1f} dB, side paths {status['quantized_side_paths']}")
    assert not tracebacks_in(log), tracebacks_in(log)
    assert status["quantized_side_paths"] > 0
    assert psnr(lora_q, base_q) <= CHANGED_MAX_PSNR_DB, "the LoRA did not change the W8A8 image"
    mse = lambda a, b: float(np.mean((a - b) ** 2))  # noqa: E731
    assert mse(lora_q, loras["merged"]) < 0.25 * mse(lora_q, loras["base"])  # W8A8 + LoRA sits by the float merge
    back, _, _ = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:sd3lora_kohya:{STRENGTH}>")
    assert psnr(back, loras["merged"]) >= MIN_PSNR_DB, "after MixDQ off the float LoRA is not the merge any more"
