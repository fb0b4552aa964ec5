"""The MixDQ toggle against stand-in A1111 modules and a small MMDiT with A1111's layer names."""


import pytest
import torch
from a1111.mmdit import TinyMMDiT
from a1111.models import Model
from a1111.processing import P
from feature_registration import registered

from lib_sd3.mixdq import config as mixdq_config
from lib_sd3.mixdq import kernels
from lib_sd3.mixdq import model as mixdq_model
from lib_sd3.mixdq.qlinear import QuantLinear
from lib_sd3.webui import hooks, routes, script_args, settings


@pytest.fixture
def webui(fake_webui, tmp_path):
    """A1111 with an SD3 model loaded: shared.sd_model.model.diffusion_model is the MMDiT (both states)."""
    from lib_sd3.webui import mixdq

    registered(mixdq)
    torch.manual_seed(0)
    mmdit = TinyMMDiT(depth=24, dim=64)  # SD3 Medium's depth and layer names, toy width
    sd_model = Model("SD3", sd_model_hash="0123abcd", diffusion_model=mmdit)
    fake_webui.shared.sd_model = sd_model
    fake_webui.shared.opts.data["sd3_mixdq"] = "off"
    fake_webui.module("modules.paths_internal", models_path=str(tmp_path))
    fake_webui.mmdit, fake_webui.tmp = mmdit, tmp_path
    yield fake_webui
    mixdq_model.restore(mmdit)
    mixdq._last_report.clear()


def processing():
    return P()


def run_hooks(p, api_args):
    values = script_args.resolve(script_args.parse(api_args), settings.get)
    for hook in hooks.PROCESS:
        hook(p, values)


def test_alwayson_args_toggle_and_restore_bit_identical(webui):
    mmdit = webui.mmdit
    before = {k: v.clone() for k, v in mmdit.state_dict().items()}
    baseline = mixdq_model.module_bytes(mmdit)
    p = processing()
    run_hooks(p, ({"mixdq": "w8a8"},))
    assert isinstance(mmdit.joint_blocks[5].x_block.mlp.fc1, QuantLinear)
    assert p.extra_generation_params["SD3 MixDQ"] == "w8a8"
    assert p.extra_generation_params["SD3 MixDQ hash"] == mixdq_config.load("w8a8").digest()
    assert mixdq_model.module_bytes(mmdit) < 0.6 * baseline
    run_hooks(p, ({"mixdq": "w4a8"},))  # switch configs
    assert mmdit.joint_blocks[5].x_block.mlp.fc1.w_bits == 4
    p = processing()
    run_hooks(p, ({"mixdq": "off"},))
    assert "SD3 MixDQ" not in p.extra_generation_params
    assert mixdq_model.module_bytes(mmdit) == baseline
    assert all(torch.equal(v, mmdit.state_dict()[k]) for k, v in before.items())


def test_setting_decides_when_the_arg_says_setting(webui):
    webui.shared.opts.data["sd3_mixdq"] = "w4a8"
    p = processing()
    run_hooks(p, ())
    assert p.extra_generation_params["SD3 MixDQ"] == "w4a8"


def test_quantized_model_still_generates(webui):
    mmdit = webui.mmdit
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 10, 48, generator=g)
    ctx[:, 0] *= 30
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 32, generator=g), ctx)
    with torch.no_grad():
        ref = mmdit(*args)
        run_hooks(processing(), ({"mixdq": "w8a8"},))
        out = mmdit(*args)
    assert torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0) > 0.999


def test_routes_get_post_and_errors(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    routes.mount(app)
    client = TestClient(app)
    state = client.get("/sd3/mixdq").json()
    assert state["active"] is False and state["choices"][:4] == ["off", "w8a8", "w4a8", "fp8"]
    body = client.post("/sd3/mixdq", json={"config": "w8a8"}).json()
    assert body["active"] is True and body["config"] == "w8a8"
    assert body["memory_after_mb"] < body["memory_before_mb"]
    assert body["kernel"] in kernels.PATHS and body["kernel_why"]  # which kernel path runs, and why
    assert webui.shared.opts.data["sd3_mixdq"] == "w8a8"  # the next generation agrees with the route
    assert client.get("/sd3/status").json()["features"]["MixDQ"]["active"] is True
    bad = client.post("/sd3/mixdq", json={"config": "w2a2"})
    assert bad.status_code == 400 and "w2a2" in bad.json()["detail"]
    assert client.post("/sd3/mixdq", json={"config": "off"}).json()["active"] is False
    webui.shared.sd_model = Model("SD1")
    assert client.post("/sd3/mixdq", json={"config": "w8a8"}).status_code == 409
    assert client.get("/sd3/mixdq").json()["sd3_loaded"] is False


def test_status_keeps_its_last_change_when_an_image_changes_nothing(webui, monkeypatch):
    """``GET /sd3/mixdq``'s ``last_change`` is the last real change, not a fresh "to off" after every image."""
    from lib_sd3.webui import mixdq

    readings = iter(range(1, 1000))  # a different memory reading each time one is taken
    monkeypatch.setattr(mixdq, "_cuda_allocated", lambda: next(readings) << 20)
    run_hooks(processing(), ({"mixdq": "off"},))
    assert "last_change" not in mixdq.mixdq_status()  # nothing was ever changed
    run_hooks(processing(), ({"mixdq": "w8a8"},))
    run_hooks(processing(), ({"mixdq": "off"},))
    change = mixdq.mixdq_status()["last_change"]
    assert change["to"] == "off"
    for args in (({"mixdq": "off"},), ()):  # off again, by the arg and by the setting
        run_hooks(processing(), args)
        assert mixdq.mixdq_status()["last_change"] == change
    run_hooks(processing(), ({"mixdq": "w8a8"},))
    change = mixdq.mixdq_status()["last_change"]
    run_hooks(processing(), ({"mixdq": "w8a8"},))
    assert mixdq.mixdq_status()["last_change"] == change and change["to"] == "w8a8"


def test_user_config_that_does_not_fit_is_a_clear_400(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    folder = webui.tmp / "sd3_mixdq"
    folder.mkdir()
    (folder / "sdxl.yaml").write_text("weight:\n  down_blocks.1.attentions.0.proj_in: 8\n", encoding="utf-8")
    app = FastAPI()
    routes.mount(app)
    response = TestClient(app).post("/sd3/mixdq", json={"config": "sdxl"})
    assert response.status_code == 400
    assert "down_blocks.1.attentions.0.proj_in" in response.json()["detail"]
    assert mixdq_model.state(webui.mmdit) is None


def test_second_toggle_uses_the_disk_cache(webui):
    from lib_sd3.webui import mixdq

    first = mixdq.apply_choice("w8a8")
    mixdq.apply_choice("off")
    second = mixdq.apply_choice("w8a8")
    assert first["cache_hit"] is False and second["cache_hit"] is True
    assert list((webui.tmp / "sd3_mixdq" / "cache").glob("mixdq-0123abcd-*.safetensors"))


def test_flag_with_a_yaml_path_is_used_whenever_on(webui, tmp_path):
    from lib_sd3.webui import mixdq

    names = {n: 8 for n in ("joint_blocks.0.x_block.mlp.fc1", "joint_blocks.1.x_block.mlp.fc2")}
    path = tmp_path / "mine.yaml"
    mixdq_config.save(mixdq_config.BitConfig(weight=names, name="mine"), path)
    webui.shared.cmd_opts.sd3_mixdq = str(path)
    mixdq._apply_flag_to_setting()
    assert webui.shared.opts.data["sd3_mixdq"] == "w8a8"
    p = processing()
    run_hooks(p, ())
    assert p.extra_generation_params["SD3 MixDQ"] == "mine"
    assert isinstance(webui.mmdit.joint_blocks[0].x_block.mlp.fc1, QuantLinear)
    assert not isinstance(webui.mmdit.joint_blocks[0].x_block.mlp.fc2, QuantLinear)


def test_model_loaded_quantizes_when_the_setting_is_on(webui):
    from lib_sd3.webui import startup

    webui.shared.opts.data["sd3_mixdq"] = "w8a8"
    startup.on_model_loaded(webui.shared.sd_model)
    assert mixdq_model.state(webui.mmdit).config.name == "w8a8"


def test_weight_reload_restores_float_layers_first(webui):
    from lib_sd3.webui import mixdq
    from lib_sd3.webui.registry import REGISTRY

    seen = {}

    def load_model_weights(model, checkpoint_info, state_dict, timer):
        seen["fc1"] = type(model.model.diffusion_model.joint_blocks[0].x_block.mlp.fc1)

    webui.module("modules.sd_models", load_model_weights=load_model_weights)
    assert REGISTRY.apply(mixdq.PATCH.name).value == "applied"
    try:
        mixdq.apply_choice("w8a8")
        import modules.sd_models

        modules.sd_models.load_model_weights(webui.shared.sd_model, None, {}, None)
        assert seen["fc1"] is torch.nn.Linear
        assert mixdq_model.state(webui.mmdit) is None
    finally:
        REGISTRY.undo(mixdq.PATCH.name)


def test_ui_shows_memory(webui):
    from lib_sd3.webui import mixdq

    mixdq.build_ui(False)
    assert "MixDQ off" in mixdq.state_html()
    mixdq.apply_choice("w4a8")
    assert "w4a8" in mixdq.state_html() and "&rarr;" in mixdq.state_html() and "kernel" in mixdq.state_html()
