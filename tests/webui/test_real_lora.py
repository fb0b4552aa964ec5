"""SD3 LoRA in a real A1111 (issue 15), both states: every file layout applies through the built-in Lora extension.

One random rank-4 LoRA on every Linear of the tiny MMDiT is written in five layouts (kohya/Stability, diffusers,
peft, OneTrainer, LyCORIS LoKr) into ``models/Lora``. ``<lora:NAME:0.8>`` must change the image and give the
image of a checkpoint with the same LoRA merged offline (``W += 0.8 * scale * B A``), for every layout; the
Lora tab lists the files as SD3; a file of garbage keys costs one warning line and nothing else; with MixDQ
W8A8 on, the LoRA still applies (float side path beside the int8 layers).

Issue 22: a LoRA with text-encoder keys does not outlive a checkpoint switch (the early branch reads CLIP once
per model); a truncated file and a LoRA for another model cost one line and are named in the infotext as not
applied; a bf16 LoHa / LoKr gives exactly the image of its fp32 twin (same values).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from webui_support import psnr, tracebacks_in, txt2img

from lib_sd3.lora import names
from lib_sd3.webui import infotext

MMDIT = "model.diffusion_model."
RANK, ALPHA, STRENGTH = 4, 8.0, 0.8
MIN_PSNR_DB = 40.0
CHANGED_MAX_PSNR_DB = 30.0  # the LoRA must visibly change the picture
FORMATS = ("kohya", "diffusers", "peft", "onetrainer", "lycoris_lokr")
TE_LORA = "sd3lora_te_and_unet"
TRUNCATED_LORA = "sd3lora_truncated"
SD15_LORA = "sd3lora_for_sd15"
LOW_PRECISION = ("loha", "lokr")
TE_LAYERS = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")


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


def _text_encoder_lora(webui) -> dict[str, torch.Tensor]:
    """kohya ``lora_te1_`` / ``lora_te2_``: a random rank-4 LoRA on every attention / MLP Linear of CLIP-L and G."""
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(22)
    out = {}
    for prefix, file in (("lora_te1_", "clip_l.safetensors"), ("lora_te2_", "clip_g.safetensors")):
        with safe_open(str(webui.data_dir / "models" / "CLIP" / file), "pt") as clip:
            for key in sorted(k for k in clip.keys() if TE_LAYERS.match(k)):
                w = clip.get_tensor(key).float()
                a = torch.randn(RANK, w.shape[1], generator=gen) / w.shape[1] ** 0.5
                b = torch.randn(w.shape[0], RANK, generator=gen) * float(w.std()) * 0.4 * (w.shape[1] / RANK) ** 0.5
                name = prefix + key[: -len(".weight")].replace(".", "_")
                out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                            f"{name}.alpha": torch.tensor(ALPHA)})
    return out


def _lycoris_twins(pieces) -> dict[str, dict[str, torch.Tensor]]:
    """LoHa ``(B A) * 1`` and LoKr ``[[1]] (x) B A`` of the test LoRA, in values bf16 holds exactly."""
    files: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in LOW_PRECISION}
    for name, (_target, a, b) in pieces.items():
        a, b = a.bfloat16().float(), b.bfloat16().float()
        key = "lycoris_" + name.replace(".", "_")
        files["loha"].update({f"{key}.hada_w1_a": b, f"{key}.hada_w1_b": a, f"{key}.alpha": torch.tensor(ALPHA),
                              f"{key}.hada_w2_a": torch.ones(b.shape[0], RANK),
                              f"{key}.hada_w2_b": torch.full((RANK, a.shape[1]), 1.0 / RANK)})
        files["lokr"].update({f"{key}.lokr_w1": torch.ones(1, 1), f"{key}.lokr_w2_a": b, f"{key}.lokr_w2_b": a,
                              f"{key}.alpha": torch.tensor(ALPHA)})
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
    files = _files(pieces)
    save_file({k: v.contiguous() for k, v in {**files["kohya"], **_text_encoder_lora(webui)}.items()},
              str(folder / f"{TE_LORA}.safetensors"))
    whole = (folder / "sd3lora_kohya.safetensors").read_bytes()
    (folder / f"{TRUNCATED_LORA}.safetensors").write_bytes(whole[: len(whole) * 2 // 3])
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4)},
              str(folder / f"{SD15_LORA}.safetensors"))
    for kind, tensors in _lycoris_twins(pieces).items():
        for dtype in (torch.float32, torch.bfloat16):
            save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
                      str(folder / f"sd3lora_{kind}_{str(dtype).split('.')[-1]}.safetensors"))
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


# --- issue 22 ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _another_checkpoint(webui):
    """sd3-tiny under a second name (a hard link beside it): a real checkpoint switch to the same weights."""
    base = _checkpoint(webui).resolve()
    other = base.parent / f"sd3-tiny-switch-{os.getpid()}.safetensors"
    other.unlink(missing_ok=True)
    try:
        os.link(base, other)
    except OSError:
        import shutil

        shutil.copyfile(base, other)
    try:
        assert webui.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        yield other.stem
    finally:
        other.unlink(missing_ok=True)
        webui.post("/sdapi/v1/refresh-checkpoints")


def _not_applied(info) -> str | None:
    return info.get("extra_generation_params", {}).get(infotext.LORA_NOT_APPLIED)


def test_text_encoder_lora_does_not_outlive_a_checkpoint_switch(webui, loras):
    """base -> <lora> -> another checkpoint -> back: the prompt without the tag is the base image again, and the
    LoRA used again gives its first image (its text-encoder part once, not twice)."""
    prompt = f"a cat <lora:{TE_LORA}:{STRENGTH}>"
    unet_only, _, _ = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:sd3lora_kohya:{STRENGTH}>")
    first, info, log = txt2img(webui, sampler_name="Euler", prompt=prompt)  # the last generation before the switch
    assert not tracebacks_in(log), tracebacks_in(log)
    report = webui.status()["features"]["LoRA"]["loras"][TE_LORA]
    assert report["unmatched"] == 0 and report["applied"], report
    te_effect = psnr(first, unet_only)
    assert te_effect <= CHANGED_MAX_PSNR_DB, "the text-encoder part of the LoRA changes nothing: the test is blind"
    assert _not_applied(info) is None
    with _another_checkpoint(webui) as other:
        _, _, log = txt2img(webui, sampler_name="Euler", override_settings={"sd_model_checkpoint": other},
                            override_settings_restore_afterwards=True)
        assert other in log, "no checkpoint switch happened"
    after, _, _ = txt2img(webui, sampler_name="Euler")  # A1111 loads sd3-tiny back for this one
    print(f"\n[{webui.state}] text encoders' share {te_effect:.1f} dB; after the switch: "
          f"{psnr(after, loras['base']):.1f} dB from the base image")
    assert np.array_equal(after, loras["base"]), "the text-encoder LoRA stayed merged after the checkpoint switch"
    again, _, _ = txt2img(webui, sampler_name="Euler", prompt=prompt)
    assert np.array_equal(again, first), f"the LoRA again: {psnr(again, first):.1f} dB from its first image"


def test_truncated_lora_is_one_line_and_named_not_applied(webui, loras):
    image, info, log = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:{TRUNCATED_LORA}:1>")
    assert not tracebacks_in(log), tracebacks_in(log)
    lines = [line for line in log.splitlines() if f"LoRA {TRUNCATED_LORA}" in line]
    assert len(lines) == 1 and "not applied" in lines[0], log[-3000:]
    assert np.array_equal(image, loras["base"])
    assert _not_applied(info) == TRUNCATED_LORA, info.get("extra_generation_params")
    report = webui.status()["features"]["LoRA"]["loras"][TRUNCATED_LORA]
    assert report["applied"] is False and report["error"].startswith("unreadable file"), report


def test_lora_for_another_model_is_said_not_applied(webui, loras):
    image, info, log = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:{SD15_LORA}:1>")
    assert not tracebacks_in(log), tracebacks_in(log)
    lines = [line for line in log.splitlines() if f"LoRA {SD15_LORA}" in line]
    assert len(lines) == 1 and "not applied" in lines[0], log[-3000:]
    assert np.array_equal(image, loras["base"])
    assert _not_applied(info) == SD15_LORA, info.get("extra_generation_params")
    assert webui.status()["features"]["LoRA"]["loras"][SD15_LORA]["applied"] is False
    both, info, _ = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:{SD15_LORA}:1> <lora:sd3lora_kohya:{STRENGTH}>")
    assert _not_applied(info) == SD15_LORA and psnr(both, loras["merged"]) >= MIN_PSNR_DB


@pytest.mark.parametrize("kind", LOW_PRECISION)
def test_bf16_lycoris_gives_the_image_of_its_fp32_twin(webui, loras, kind):
    """Same values in both files: A1111 must not add the delta (nor the base weight) in bf16."""
    fp32, _, _ = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:sd3lora_{kind}_float32:{STRENGTH}>")
    bf16, _, log = txt2img(webui, sampler_name="Euler", prompt=f"a cat <lora:sd3lora_{kind}_bfloat16:{STRENGTH}>")
    print(f"\n[{webui.state}] {kind}: fp32 {psnr(fp32, loras['merged']):.1f} dB, bf16 {psnr(bf16, loras['merged']):.1f} dB "
          f"from the offline merge; bf16 vs fp32 {psnr(bf16, fp32):.1f} dB")
    assert not tracebacks_in(log), tracebacks_in(log)
    assert psnr(fp32, loras["merged"]) >= MIN_PSNR_DB
    assert np.array_equal(bf16, fp32), f"bf16 {kind}: {psnr(bf16, fp32):.1f} dB from its fp32 twin"
