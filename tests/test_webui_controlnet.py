"""The WebUI's ControlNet path (lib_sd3/webui/controlnet.py) on the fake A1111: a unit asked for through the SD3
script's args is found, loaded, encoded and attached so that a model call returns what Stability's loop on
diffusers' modules returns for that control image (tests/tiny_controlnet.py); the infotext it writes pastes back;
a unit that cannot run is one line."""

from __future__ import annotations

import base64
import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lib_sd3.controlnet.detect import ControlNetError, ControlType
from lib_sd3.controlnet.preprocess import control_latent, control_map
from lib_sd3.webui import options, script_args, settings
from lib_sd3.webui.controlnet import ControlNets, accordion_requests
from lib_sd3.webui.generation import GENERATIONS
from tests import tiny_controlnet, tiny_sd35

TOLERANCE = 1e-4
SIZE = 128  # pixels: a 16x16 latent


def picture() -> Image.Image:
    array = np.zeros((SIZE, SIZE, 3), np.uint8)
    array[32:96, 40:100] = (250, 120, 30)
    return Image.fromarray(array)


def encode(x: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for the SD3 VAE: 8x8 average pool, 3 -> 16 channels."""
    weight = torch.randn(16, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    return torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(x.float(), 8), weight)


def values(**args) -> dict:
    return script_args.resolve(script_args.parse((args,)), settings.get)


@pytest.fixture
def bed(fake_webui, tmp_path):
    models = tmp_path / "models"
    (models / "ControlNet").mkdir(parents=True)
    fake_webui.module("modules.paths_internal", models_path=str(models))
    ref_base = tiny_controlnet.write_base(tmp_path / "base.safetensors")
    ref_cn = tiny_controlnet.write_controlnet(models / "ControlNet" / "canny-tiny.safetensors", control_type=1)
    (models / "ControlNet" / "sd15_canny.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    family, mmdit = tiny_sd35.load_mmdit(tmp_path / "base.safetensors")
    sd_model = types.SimpleNamespace(is_sd3=True, sd3_family=family, model=types.SimpleNamespace(diffusion_model=mmdit),
                                     encode_first_stage=encode, first_stage_model=torch.nn.Linear(1, 1))
    fake_webui.shared.sd_model = sd_model
    fake_webui.module("modules.sd_models", model_data=types.SimpleNamespace(sd_model=sd_model))
    return types.SimpleNamespace(ref_base=ref_base, ref_cn=ref_cn, mmdit=mmdit, sd_model=sd_model)


def p_for(bed, **kwargs):
    return types.SimpleNamespace(**{"sd_model": bed.sd_model, "width": SIZE, "height": SIZE,
                                    "extra_generation_params": {}, "init_images": None, **kwargs})


def test_a_unit_runs_as_the_reference_on_diffusers(bed):
    controlnets = ControlNets()
    p = p_for(bed)
    args = values(controlnet_1_model="canny-tiny", controlnet_1_image=picture(), controlnet_1_strength=0.7,
                  controlnet_1_preprocessor="blur", controlnet_1_blur_radius=3)
    GENERATIONS.start(p, args)
    controlnets.process(p, args)
    controlnets.before_sampling(p, args)
    x, context, pooled = tiny_sd35.inputs(seed=3, batch=2)
    t = torch.full((2,), 600.0)
    with torch.no_grad():
        controlnets.attach(types.SimpleNamespace(sampling_step=0, total_sampling_steps=4))
        got = bed.mmdit(x, t, y=pooled, context=context)
        controlnets.detach()
        bare = bed.mmdit(x, t, y=pooled, context=context)  # after on_cfg_denoised (SLG's pass): no control
        latent = control_latent(control_map(picture(), SIZE, SIZE, "blur", radius=3), ControlType.CANNY, encode,
                                shift_scale_latent=False)
        hidden = tiny_controlnet.reference_hidden(bed.ref_base, bed.ref_cn, x, t, pooled, latent, strength=0.7)
        expected = tiny_controlnet.reference_velocity(bed.ref_base, x, t, context, pooled, hidden)
        plain = tiny_controlnet.reference_velocity(bed.ref_base, x, t, context, pooled, [torch.zeros(1)] * 2)
    assert (got - expected).abs().max().item() < TOLERANCE
    assert (bare - plain).abs().max().item() < TOLERANCE and (got - bare).abs().max().item() > 1e-2
    entry = p.extra_generation_params["SD3 ControlNet 1"]
    assert entry == ("model canny-tiny; type canny; preprocessor blur; blur radius 3; strength 0.7; steps 0-1; "
                     "resize Just resize")  # no hashes outside A1111
    pasted = options.pasted_values({"SD3 ControlNet 1": entry, "SD3 flow samplers": "True"})
    assert {k: v for k, v in pasted.items() if k.startswith("controlnet_1_")} == {
        "controlnet_1_model": "canny-tiny", "controlnet_1_type": "canny", "controlnet_1_preprocessor": "blur",
        "controlnet_1_blur_radius": 3.0, "controlnet_1_strength": 0.7, "controlnet_1_start": 0.0,
        "controlnet_1_end": 1.0, "controlnet_1_resize_mode": "Just resize"}
    assert pasted["controlnet_2_model"] == "None"  # an SD3 infotext without unit 2: unit 2 off
    controlnets.postprocess(p, None, args)
    assert len(controlnets.cache) == 1  # kept for the next generation
    controlnets.postprocess(p_for(bed), None, values())  # a generation without it
    assert len(controlnets.cache) == 0


def test_strength_zero_and_units_that_cannot_run_touch_nothing(bed):
    controlnets = ControlNets()
    p = p_for(bed)
    args = values(controlnet_1_model="canny-tiny", controlnet_1_image=picture(), controlnet_1_strength=0,
                  controlnet_2_model="sd15_canny", controlnet_2_image=picture(),
                  controlnet_3_model="canny-tiny")  # no image, not img2img
    GENERATIONS.start(p, args)
    controlnets.process(p, args)
    assert p.sd3.controlnet is None and len(controlnets.cache) == 0
    entries = p.extra_generation_params
    assert entries["SD3 ControlNet 1"] == "off (strength 0)"
    assert entries["SD3 ControlNet 2"].startswith("off (sd15_canny") and "\n" not in entries["SD3 ControlNet 2"]
    assert entries["SD3 ControlNet 3"].startswith("off (no control image")


def test_img2img_without_a_control_image_uses_the_init_image(bed):
    controlnets = ControlNets()
    p = p_for(bed, init_images=[picture()])
    args = values(controlnet_1_model="canny-tiny.safetensors")
    GENERATIONS.start(p, args)
    controlnets.process(p, args)
    controlnets.before_sampling(p, args)
    unit = p.sd3.controlnet.stack.units[0]
    expected = control_latent(control_map(picture(), SIZE, SIZE), ControlType.CANNY, encode, shift_scale_latent=False)
    assert torch.equal(unit.latent, expected)
    p.is_hr_pass, p.hr_upscale_to_x, p.hr_upscale_to_y = True, 2 * SIZE, 2 * SIZE
    controlnets.before_sampling(p, args)  # the hires pass: the map at its size
    assert p.sd3.controlnet.stack.units[0].latent.shape[-2:] == (2 * SIZE // 8, 2 * SIZE // 8)
    assert p.sd3.controlnet.passes == [(SIZE, SIZE), (2 * SIZE, 2 * SIZE)]


@pytest.mark.parametrize("args, words", [
    ({"controlnet_1_model": "nope"}, ["controlnet_1_model", "no SD3 ControlNet named 'nope'"]),
    ({"controlnet_1_model": "sd15_canny"}, ["controlnet_1_model", "sd15_canny"]),
    ({"controlnet_1_model": "canny-tiny", "controlnet_1_start": 0.8, "controlnet_1_end": 0.2}, ["start <= end"]),
    ({"controlnet_2_model": "canny-tiny", "controlnet_2_preprocessor": "canny", "controlnet_2_canny_low": 200,
      "controlnet_2_canny_high": 100}, ["controlnet_2_canny_low", "low <= high"]),
])
def test_api_check_is_one_line(bed, args, words):
    line = ControlNets().api_check(values(**args))
    assert line is not None and "\n" not in line and all(word in line for word in words), line
    assert ControlNets().api_check(values(controlnet_1_model="canny-tiny")) is None


@pytest.mark.parametrize("value, ok", [
    ("AAAA", False),  # base64 of three zero bytes: not an image
    ("data:image/png;base64,!!!", False),
    (12, False),
    (None, True),
])
def test_image_arg(value, ok):
    if ok:
        assert script_args.parse(({"controlnet_1_image": value},))["controlnet_1_image"] == "setting"
        return
    with pytest.raises(script_args.ScriptArgError) as error:
        script_args.parse(({"controlnet_1_image": value},))
    assert "controlnet_1_image" in str(error.value) and "base64" in str(error.value)


def test_image_arg_decodes_png():
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    text = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image = script_args.parse(({"controlnet_1_image": text},))["controlnet_1_image"]
    assert image.size == (SIZE, SIZE) and np.array_equal(np.asarray(image.convert("RGB")), np.asarray(picture()))


def test_requests_only_for_units_with_a_model():
    requests = accordion_requests(values(controlnet_2_model="x", controlnet_2_type="depth",
                                         controlnet_2_preprocessor="canny", controlnet_2_canny_low=50.0))
    assert [(r.source, r.model, r.control_type, r.params) for r in requests] == [
        ("ControlNet 2", "x", ControlType.DEPTH, {"low": 50, "high": 200})]


def test_files_by_name_and_why_others_are_not_offered(bed):
    files = ControlNets().files
    found, skipped = files.scan()
    assert [f.name for f in found] == ["canny-tiny"] and "sd15_canny" in skipped
    assert files.find("canny-tiny [0123456789]").name == "canny-tiny"  # the infotext's form; hash not checked here
    with pytest.raises(ControlNetError):
        files.find("missing")
