"""lib_sd3.webui.t5 against stand-ins shaped like A1111's SD3 text encoders (dev and early state).

The stand-ins (tests/a1111/other_impls.py: ``T5XXLModel``; tests/a1111/sd3.py: the ``SD3Cond`` of each state
that builds it) keep what our code touches, with A1111's names and shapes; their arithmetic is simpler
than T5's: these tests judge loading and wiring, not T5.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch
from a1111 import sd3 as a1111_sd3
from a1111.models import Model
from a1111.other_impls import T5_CONFIG, T5XXLModel, tokenize
from a1111.processing import P
from hf_mirror import HFMirror

from lib_sd3 import fetch as fetcher
from lib_sd3 import t5 as t5_lib
from lib_sd3.fetch import FetchOptions
from lib_sd3.fetch.known_files import A1111_TEXT_ENCODERS, CLIP_L, T5_FP8, T5_FP16, KnownFile
from lib_sd3.hashing import sha256_bytes

GIB = 1 << 30


# ------------------------------------------------------------------------------------------ test files
def reference_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.to(torch.float16) for k, v in T5XXLModel(T5_CONFIG).transformer.state_dict().items()}


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


FP16_STATE = reference_state()
LINEAR = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")
FP8_STATE = {k: (v.to(torch.float8_e4m3fn) if k.endswith(LINEAR) else v) for k, v in FP16_STATE.items()}
FILES = {T5_FP16: safetensors_bytes(FP16_STATE), T5_FP8: safetensors_bytes(FP8_STATE), CLIP_L: safetensors_bytes({"clip_l.weight": torch.ones(1500)})}


def expected_output(state: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """An independent T5: a plain fp32 model loaded the ordinary way from the same tensors."""
    model = T5XXLModel(T5_CONFIG)
    model.transformer.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        return model(tokenize(prompts))[0]


def known(name: str) -> tuple[KnownFile, ...]:
    data = FILES[name]
    return (KnownFile(name, A1111_TEXT_ENCODERS, name, len(data), sha256_bytes(data), True),)


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["dev", "early"])
def webui(request, fake_webui, tmp_path, monkeypatch):
    shared = fake_webui.shared
    shared.models_path = str(tmp_path / "models")
    shared.opts.data.update({"sd3_enable_t5": True, "sd3_t5_mode": "auto", "sd3_fetch": True, "sd3_mirrors": ""})
    shared.cmd_opts = types.SimpleNamespace(sd3_t5=None, sd3_no_fetch=False, sd3_mirror=None)
    fake_webui.module("modules.devices", dtype=torch.float32, device=torch.device("cpu"))
    fake_webui.module("modules.models.sd3.other_impls", T5XXLModel=T5XXLModel)
    a1111_sd3.install(fake_webui, request.param, cond=a1111_sd3.T5_CONDS[request.param](shared), T5_CONFIG=T5_CONFIG)
    calls = []
    fake_webui.module("modules.modelloader", load_file_from_url=lambda url, **kw: calls.append((url, kw)) or "orig")
    fake_webui.original_downloads = calls

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(fetcher.endpoints, "DEFAULT_ENDPOINT", "http://127.0.0.1:9")  # the real Hub is never asked
    monkeypatch.setattr(t5_lib, "free_memory", lambda: (64 * GIB, None))

    from lib_sd3.webui import t5 as t5_webui

    feature = t5_webui.T5Feature(t5_webui.FetchSetup({name: known(name) for name in FILES},
                                                     FetchOptions(backoff=0.01, auth=None)))
    tokenizer_calls = []
    feature.ensure_tokenizers = lambda: tokenizer_calls.append(1)
    fake_webui.tokenizer_calls = tokenizer_calls
    assert feature.patch.detect() is None
    feature.patch.apply()
    yield types.SimpleNamespace(ui=fake_webui, shared=shared, t5=feature, module=t5_webui, state=request.param,
                                clip=Path(shared.models_path) / "CLIP")
    feature.download.cancel()
    feature.download.wait(10)
    feature.patch.undo()


@pytest.fixture
def mirror(webui):
    with HFMirror() as m:
        for name, data in FILES.items():
            m.add(A1111_TEXT_ENCODERS, name, data)
        webui.shared.opts.data["sd3_mirrors"] = m.endpoint
        yield m


def load_sd3(webui):
    """What A1111 does: build SD3Cond (our patch inside), then fire on_model_loaded."""
    cond_class = webui.ui.module(a1111_sd3.COND_MODULE[webui.state]).SD3Cond
    model = Model("SD3", cond_stage_model=cond_class())
    webui.shared.sd_model = model
    webui.t5.refresh(model)
    return model


class Processing:
    """Like A1111's StableDiffusionProcessing as far as we use it (and weak-referenceable like it)."""

    def __init__(self, sd_model):
        self.sd_model, self.extra_generation_params = sd_model, {}


def generate(webui, model, prompts=("a cat", "sign")):
    p = P(sd_model=model)
    webui.t5.process(p, {})
    with torch.no_grad():
        return model.cond_stage_model(list(prompts)), p.extra_generation_params["SD3 T5"]


# ----------------------------------------------------------------------------------------------- tests
def test_a1111_never_builds_t5_itself(webui):
    model = load_sd3_without_refresh(webui)
    assert model.cond_stage_model.t5xxl is None, "A1111 would have built (and downloaded) T5 here"
    assert webui.shared.opts.data["sd3_enable_t5"] is True, "the user's option is put back"
    assert webui.ui.tokenizer_calls == [1], "tokenizers are ensured before A1111 loads them"


def load_sd3_without_refresh(webui):
    cond_class = webui.ui.module(a1111_sd3.COND_MODULE[webui.state]).SD3Cond
    return Model("SD3", cond_stage_model=cond_class())


def test_missing_t5_fetched_in_background_then_switched_on(webui, mirror):
    mirror.faults.rate = 10_000  # ~0.4 s: slow enough to generate while it downloads
    model = load_sd3(webui)
    status = webui.t5.status()
    assert status["fetch_state"] == "fetching" and status["fetching"] == T5_FP16

    out, infotext = generate(webui, model)
    assert infotext.startswith("off (downloading")
    assert torch.count_nonzero(out) == 0, "meanwhile generations run without T5"

    assert webui.t5.download.wait(30)
    assert (webui.clip / T5_FP16).read_bytes() == FILES[T5_FP16]
    cond = model.cond_stage_model
    assert cond.t5xxl is not None and webui.shared.opts.data["sd3_enable_t5"] is True
    if webui.state == "dev":
        assert cond.model_t5.t5xxl is cond.t5xxl
    out, infotext = generate(webui, model)
    assert infotext == "fp16"
    torch.testing.assert_close(out, expected_output(FP16_STATE, ["a cat", "sign"]))
    weights = {p.dtype for n, p in cond.t5xxl.named_parameters() if n.endswith(LINEAR)}
    assert weights == {torch.float16}, "kept in the file's fp16, not devices.dtype's fp32"
    assert webui.ui.original_downloads == [], "A1111's own downloader was never asked for T5"


def test_auto_picks_fp8_when_memory_is_short(webui, mirror, monkeypatch):
    monkeypatch.setattr(t5_lib, "free_memory", lambda: (8 * GIB, None))
    model = load_sd3(webui)
    assert webui.t5.download.wait(30)
    assert (webui.clip / T5_FP8).exists() and not (webui.clip / T5_FP16).exists()
    out, infotext = generate(webui, model)
    assert infotext == "fp8"
    weights = {p.dtype for n, p in model.cond_stage_model.t5xxl.named_parameters() if n.endswith(LINEAR)}
    assert weights == {torch.float8_e4m3fn}
    torch.testing.assert_close(out, expected_output(FP8_STATE, ["a cat", "sign"]))
    reference = expected_output(FP16_STATE, ["a cat", "sign"])
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99


def test_t5_never_switched_on_where_it_cannot_fit(webui, mirror, monkeypatch):
    monkeypatch.setattr(t5_lib, "free_memory", lambda: (4 * GIB, None))
    model = load_sd3(webui)
    assert webui.t5.status()["fetch_state"] == "idle" and mirror.requests == [], "no 5 GB download for nothing"
    out, infotext = generate(webui, model)
    assert infotext == "off" and "needs" in webui.t5.status()["reason"]


def test_failed_fetch_degrades_to_no_t5_with_manual_path(webui, mirror):
    mirror.faults.status = 404
    model = load_sd3(webui)
    assert webui.t5.download.wait(30)
    status = webui.t5.status()
    assert status["fetch_state"] == "failed"
    assert f"{mirror.endpoint}/{A1111_TEXT_ENCODERS}/resolve/main/{T5_FP16}" in status["manual"]
    assert str(webui.clip / T5_FP16) in status["manual"] and known(T5_FP16)[0].sha256 in status["manual"]
    out, infotext = generate(webui, model)
    assert infotext == "off (download failed)" and torch.count_nonzero(out) == 0


def test_no_fetch_flag_never_touches_network(webui, mirror):
    webui.shared.cmd_opts.sd3_no_fetch = True
    model = load_sd3(webui)
    assert mirror.requests == []
    assert webui.t5.status()["fetch_state"] == "offline"
    assert generate(webui, model)[1] == "off (missing; downloads off)"


def test_hf_hub_offline_never_touches_network(webui, mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_sd3(webui)
    assert mirror.requests == [] and webui.t5.status()["fetch_state"] == "offline"


def test_present_file_is_used_without_network_and_off_mode_detaches(webui, mirror):
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    model = load_sd3(webui)
    assert mirror.requests == [] and generate(webui, model)[1] == "fp16"
    webui.shared.opts.data["sd3_t5_mode"] = "off"
    webui.t5.refresh(model)
    assert model.cond_stage_model.t5xxl is None and generate(webui, model)[1] == "off"


def test_corrupt_file_on_disk_costs_t5_not_the_model(webui, mirror):
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(b"\0" * len(FILES[T5_FP16]))  # right size, not a safetensors file
    model = load_sd3(webui)
    status = webui.t5.status()
    assert status["mode"] == "off" and status["fetch_state"] == "unusable" and "left alone" in status["error"]
    assert status["files"][T5_FP16] is False and status["file_states"][T5_FP16]["state"] == "unusable"
    out, infotext = generate(webui, model)
    assert infotext == "off (T5 file unusable)" and torch.count_nonzero(out) == 0
    assert (webui.clip / T5_FP16).read_bytes() == b"\0" * len(FILES[T5_FP16]) and mirror.requests == []


def test_file_that_fails_to_load_costs_t5_not_the_model(webui, mirror, monkeypatch):
    from lib_sd3.webui import t5_model

    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])

    def broken(path, fp8):
        raise ValueError("tensor data unreadable")

    monkeypatch.setattr(t5_model, "build_t5", broken)
    model = load_sd3(webui)
    status = webui.t5.status()
    assert status["mode"] == "off" and "loading" in status["error"] and "unreadable" in status["error"]
    out, infotext = generate(webui, model)
    assert infotext == "off" and torch.count_nonzero(out) == 0


def test_fp16_file_serves_fp8_without_download(webui, mirror, monkeypatch):
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    webui.shared.cmd_opts.sd3_t5 = "fp8"  # the flag overrides the setting
    model = load_sd3(webui)
    assert mirror.requests == [] and generate(webui, model)[1] == "fp8"


def test_routes(webui, mirror, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_sd3.webui import hooks, routes

    monkeypatch.setattr(hooks, "ROUTES", [webui.t5.add_routes])
    monkeypatch.setitem(hooks.STATUS, "T5-XXL", webui.t5.status)
    app = FastAPI()
    routes.mount(app)
    client = TestClient(app)
    body = client.get("/sd3/t5").json()
    assert body["fetch_state"] == "idle" and body["files"] == {T5_FP16: False, T5_FP8: False}
    assert body["endpoints"][0] == mirror.endpoint
    body = client.post("/sd3/t5/fetch").json()
    assert body["fetch_state"] in ("fetching", "done")
    assert webui.t5.download.wait(30)
    assert client.get("/sd3/t5").json()["files"][T5_FP16] is True
    assert client.get("/sd3/status").json()["features"]["T5-XXL"]["fetch_state"] == "done"


def test_clip_downloads_go_through_the_fetcher(webui, mirror):
    from modules import modelloader

    url = f"https://huggingface.co/{A1111_TEXT_ENCODERS}/resolve/main/{CLIP_L}"
    path = modelloader.load_file_from_url(url, model_dir=str(webui.clip), file_name=CLIP_L)
    assert Path(path).read_bytes() == FILES[CLIP_L] and webui.ui.original_downloads == []
    assert modelloader.load_file_from_url("https://example.com/x.pth", model_dir="/tmp") == "orig"
    (webui.clip / CLIP_L).write_bytes(b"a user's own clip_l")  # used as is, like A1111 does
    assert Path(modelloader.load_file_from_url(url, model_dir=str(webui.clip), file_name=CLIP_L)).read_bytes() == \
        b"a user's own clip_l"
    mirror.faults.status = 404
    (webui.clip / CLIP_L).unlink()
    with pytest.raises(RuntimeError, match="SD3 needs clip_l.safetensors"):
        modelloader.load_file_from_url(url, model_dir=str(webui.clip), file_name=CLIP_L)


@pytest.mark.parametrize("kind, methods", [("loop", ("GET",)), ("no-location", ("HEAD", "GET")),
                                           ("ftp", ("HEAD", "GET"))])
def test_bad_redirects_reach_the_webui_as_a_fetch_error_with_the_manual_path(webui, mirror, kind, methods):
    """requests' own exceptions (redirect loop, no Location, ftp://) never reach A1111's model load or the T5 status."""
    from modules import modelloader

    mirror.faults.bad_redirect, mirror.faults.bad_redirect_methods = kind, methods
    url = f"https://huggingface.co/{A1111_TEXT_ENCODERS}/resolve/main/{CLIP_L}"
    with pytest.raises(RuntimeError, match="SD3 needs clip_l.safetensors") as info:
        modelloader.load_file_from_url(url, model_dir=str(webui.clip), file_name=CLIP_L)
    assert "download ONE of these URLs" in str(info.value)
    assert webui.t5.download.start(T5_FP16) and webui.t5.download.wait(30)
    status = webui.t5.status()
    assert status["fetch_state"] == "failed" and "could not download" in status["error"]
    assert "download ONE of these URLs" in status["manual"]


def test_file_with_only_shared_embedding_key_loads(webui, mirror):
    """ComfyUI-made files may store the embedding only as ``shared.weight``."""
    state = {("shared.weight" if k == "encoder.embed_tokens.weight" else k): v for k, v in FP16_STATE.items()}
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(safetensors_bytes(state))
    webui.t5.configure(dataclasses.replace(webui.t5.setup, sources={
        **webui.t5.setup.sources, T5_FP16: (dataclasses.replace(known(T5_FP16)[0], size=None),)}))
    model = load_sd3(webui)
    out, infotext = generate(webui, model)
    assert infotext == "fp16"
    torch.testing.assert_close(out, expected_output(FP16_STATE, ["a cat", "sign"]))


def test_changing_the_setting_applies_at_next_generation(webui, mirror):
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    model = load_sd3(webui)
    assert generate(webui, model)[1] == "fp16"
    webui.shared.opts.data["sd3_t5_mode"] = "fp8"
    out, infotext = generate(webui, model)
    assert infotext == "fp8" and mirror.requests == [], "the fp16 file serves fp8 without a download"
    assert webui.t5.status()["requested"] == "fp8"
    webui.shared.opts.data["sd3_t5_mode"] = "off (downloading 42%)"  # as pasted from an infotext
    out, infotext = generate(webui, model)
    assert infotext == "off" and torch.count_nonzero(out) == 0
    webui.shared.opts.data["sd3_t5_mode"] = "garbage"
    assert webui.module.requested_mode() == "auto"


def test_ui_builds_in_accordion(webui):
    webui.t5.build_ui(False)
    webui.t5.build_ui(True)


def test_download_button_only_while_a_file_is_wanted_and_missing(webui):
    webui.shared.opts.data["sd3_t5_mode"] = "off"
    assert not webui.t5.fetch_offered()
    webui.shared.opts.data["sd3_t5_mode"] = "fp16"
    assert webui.t5.fetch_offered()
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    assert not webui.t5.fetch_offered()


@pytest.mark.parametrize("wide_enough, recomputed_in", [
    (lambda call: torch.is_autocast_enabled("cpu"), "bf16"),  # what fp16 T5 does on some prompts: fine in bf16
    (lambda call: call == 3 and not torch.is_autocast_enabled("cpu"), "fp32"),  # only the last rung helps
])
def test_nonfinite_t5_output_recomputed_and_in_infotext(webui, mirror, wide_enough, recomputed_in):
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    model = load_sd3(webui)
    t5 = model.cond_stage_model.t5xxl
    encoder = t5.transformer.encoder
    real = encoder.forward
    calls = []

    def overflow_in_low_precision(ids):  # inf unless recomputed wide enough
        out = real(ids)
        calls.append(wide_enough(len(calls) + 1))
        return out if calls[-1] else out + float("inf")

    encoder.forward = overflow_in_low_precision
    out, infotext = generate(webui, model)
    assert torch.isfinite(out).all() and infotext == f"fp16 (recomputed in {recomputed_in})"
    assert calls[-1] and not any(calls[:-1]) and len(calls) == {"bf16": 2, "fp32": 3}[recomputed_in]
    assert webui.t5.status()["recomputed"] == 1
    calls.clear()
    encoder.forward = real
    out, infotext = generate(webui, model)
    assert infotext == "fp16" and torch.isfinite(out).all() and webui.t5.status()["recomputed"] == 1


def test_t5_output_non_finite_even_in_fp32_is_a_named_error(webui, mirror):
    from lib_sd3.sampling.nan_guard import NonFiniteError

    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    model = load_sd3(webui)
    encoder = model.cond_stage_model.t5xxl.transformer.encoder
    real = encoder.forward
    encoder.forward = lambda ids: real(ids) * float("nan")  # e.g. a corrupt file
    with pytest.raises(NonFiniteError, match=r"^T5 produced NaN/inf values; recomputed with bf16 autocast \(still "
                                             r"non-finite\), fp32 \(still non-finite\)\. Check the T5 file.*--sd3-t5"):
        generate(webui, model)
    assert webui.t5.status()["recomputed"] == 0


def test_ensure_tokenizers_fills_hub_cache_and_never_raises(fake_webui, tmp_path, monkeypatch):
    from lib_sd3.fetch.known_files import TOKENIZER_REPOS, tokenizer_files
    from lib_sd3.webui import text_encoder_fetch

    fake_webui.shared.opts.data.update({"sd3_fetch": True})
    fake_webui.shared.cmd_opts = types.SimpleNamespace(sd3_t5=None, sd3_no_fetch=False, sd3_mirror=None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(fetcher.endpoints, "DEFAULT_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for var in ("TRANSFORMERS_CACHE",):
        monkeypatch.delenv(var, raising=False)
    with HFMirror() as m:
        m.faults.lfs = False
        fake_webui.shared.opts.data["sd3_mirrors"] = m.endpoint
        m.faults.status = 503  # a broken mirror at model load: warnings, no exception, no long wait
        text_encoder_fetch.ensure_tokenizers(text_encoder_fetch.default_setup().tokenizer_options)
        assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.json"))
        m.faults.status = None
        for repo in TOKENIZER_REPOS:
            for known_file in tokenizer_files(repo):
                m.add(repo, known_file.path, f"{repo}/{known_file.path}".encode())
        text_encoder_fetch.ensure_tokenizers(text_encoder_fetch.default_setup().tokenizer_options)
    for repo in TOKENIZER_REPOS:
        snapshot = fetcher.cache.cached_snapshot(tmp_path / "hub", repo, [f.path for f in tokenizer_files(repo)])
        assert snapshot.complete
        assert (snapshot.path / "tokenizer_config.json").read_bytes() == f"{repo}/tokenizer_config.json".encode()


@pytest.mark.webui
@pytest.mark.parametrize("env", ["WEBUI_ROOT", "WEBUI_ROOT_EARLY"])
def test_build_t5_with_a1111s_real_t5_code(env, fake_webui, tmp_path):
    """Opt-in: our meta-build + dtype-keeping load on A1111's own T5XXLModel (its other_impls.py,
    run as is with a stand-in sd_hijack): fp16 must equal A1111's own loading exactly."""
    import os

    from safetensors.torch import save_file

    root = os.environ.get(env)
    if not root:
        pytest.skip(f"opt-in: set {env} to an A1111 checkout")
    fake_webui.module("modules.sd_hijack", TextualInversionEmbeddings=lambda *a, textual_inversion_key=None, **k:
                      torch.nn.Embedding(*a, **k))
    fake_webui.module("modules.devices", dtype=torch.float16, device=torch.device("cpu"))
    other = fake_webui.load_source(root, "modules.models.sd3.other_impls")
    config = {"d_ff": 64, "d_model": 32, "num_heads": 4, "num_layers": 2, "vocab_size": 100}
    a1111_sd3.install(fake_webui, "dev", cond=type("SD3Cond", (), {}), T5_CONFIG=config)
    torch.manual_seed(0)
    reference = other.T5XXLModel(config, device="cpu", dtype=torch.float32)
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    state = {k: v.half() for k, v in reference.transformer.state_dict().items()}
    save_file(state, str(tmp_path / T5_FP16))
    reference.transformer.load_state_dict({k: v.float() for k, v in state.items()})

    from lib_sd3.t5.file_check import encoder_layout
    from lib_sd3.webui import t5_model as t5_webui

    assert t5_webui.expected_layout() == encoder_layout(config), "the doctor's T5 layout is A1111's own"
    tokens = [[5, 6, 7, 1, 0, 0]]
    with torch.no_grad():
        want = reference(tokens)[0]
        fp16 = t5_webui.build_t5(tmp_path / T5_FP16, fp8=False)
        torch.testing.assert_close(fp16(tokens)[0], want, rtol=0, atol=0)
        fp8 = t5_webui.build_t5(tmp_path / T5_FP16, fp8=True)
        assert {p.dtype for n, p in fp8.named_parameters() if n.endswith(".q.weight")} == {torch.float8_e4m3fn}
        cosine = torch.nn.functional.cosine_similarity(fp8(tokens)[0].flatten(), want.flatten(), dim=0)
        assert cosine > 0.99
        assert t5_lib.parameter_bytes(fp8) < t5_lib.parameter_bytes(fp16)


# ------------------------------------------------------------------------------ a user's own T5 files
def scaled_fp8(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI's "scaled fp8" layout: Linear weights w / s in fp8, ``X.scale_weight`` = s (fp32 scalar),
    ``X.scale_input``, and a ``scaled_fp8`` marker; returns (file tensors, the weights they stand for)."""
    stored, meant = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, value in state.items():
        if key.endswith(LINEAR):
            scale = value.float().abs().max() / 448.0
            quantized = (value.float() / scale).to(torch.float8_e4m3fn)
            owner = key.rsplit(".", 1)[0]
            stored[key], stored[f"{owner}.scale_weight"] = quantized, scale.reshape(())
            stored[f"{owner}.scale_input"] = torch.ones(())
            meant[key] = (quantized.float() * scale).to(torch.float16)
        else:
            stored[key] = meant[key] = value
    return stored, meant


SCALED_FILE, SCALED_MEANT = scaled_fp8(FP16_STATE)
OWN_FILES = {  # name on disk, file tensors, the values T5 must compute with, precision reported
    "bf16": (T5_FP16, {k: v.to(torch.bfloat16) for k, v in FP16_STATE.items()},
             {k: v.to(torch.bfloat16) for k, v in FP16_STATE.items()}, "bf16"),
    "fp32": (T5_FP16, {k: v.float() for k, v in FP16_STATE.items()}, FP16_STATE, "fp32"),
    "fp8": (T5_FP8, FP8_STATE, FP8_STATE, "fp8"),
    "scaled fp8": (T5_FP8, SCALED_FILE, SCALED_MEANT, "fp8 scaled"),
    "comfy shared only": (T5_FP16, {("shared.weight" if k == "encoder.embed_tokens.weight" else k): v
                                    for k, v in FP16_STATE.items()}, FP16_STATE, "fp16"),
}


def test_stand_in_has_t5xxls_real_key_layout():
    from lib_sd3.t5.file_check import XXL_CONFIG, encoder_layout

    shapes = {k: tuple(v.shape) for k, v in T5XXLModel(T5_CONFIG, device="meta").transformer.state_dict().items()}
    assert shapes == encoder_layout(T5_CONFIG)
    assert len(encoder_layout(XXL_CONFIG)) == len(shapes) - 3 * 9 + 24 * 9


@pytest.mark.parametrize("variant", list(OWN_FILES))
def test_users_own_t5_file_is_attached_and_never_touched(webui, variant, monkeypatch, caplog):
    """A reduced T5 with the real key layout but another byte length than the published file: used,
    said once in the console, and still there, unrenamed, after fetches with every endpoint dead."""
    name, tensors, meant, precision = OWN_FILES[variant]
    if name == T5_FP8:
        webui.shared.opts.data["sd3_t5_mode"] = "fp8"
    webui.shared.opts.data["sd3_mirrors"] = "http://127.0.0.1:9"  # nothing listens: every endpoint dead
    webui.clip.mkdir(parents=True)
    path = webui.clip / name
    data = safetensors_bytes(tensors, metadata={"converted": "by another repo's script"})
    assert len(data) != known(name)[0].size
    path.write_bytes(data)
    inode = path.stat().st_ino
    caplog.set_level("INFO")

    model = load_sd3(webui)
    out, infotext = generate(webui, model)
    assert infotext == ("fp8" if name == T5_FP8 else "fp16")
    torch.testing.assert_close(out, expected_output(meant, ["a cat", "sign"]), rtol=1e-3, atol=1e-3)
    weights = {p.dtype for n, p in model.cond_stage_model.t5xxl.named_parameters() if n.endswith(LINEAR)}
    assert weights == {{"bf16": torch.bfloat16, "fp32": torch.float16}.get(variant, torch.float16)
                       if name == T5_FP16 else torch.float8_e4m3fn}, "fp32 files are held at fp16's planned size"
    status = webui.t5.status()
    assert status["files"][name] is True and status["file_states"][name]["state"] == "own"
    assert status["precision"] == precision and status["file_states"][name]["precision"] == precision

    webui.t5.post_fetch()  # asks for nothing: the file serves
    assert webui.t5.download.start(name) is False and webui.t5.status()["fetch_state"] == "idle"
    with pytest.raises(fetcher.FetchError, match="left alone"):
        fetcher.fetch(known(name), path, FetchOptions(endpoints=["http://127.0.0.1:9"], auth=None))
    webui.shared.opts.data["sd3_t5_mode"] = "fp16"  # needs the fp16 file: fetched, from dead endpoints
    generate(webui, model)
    assert webui.t5.download.wait(30)
    webui.t5.refresh(model)
    generate(webui, model)
    assert path.read_bytes() == data and path.stat().st_ino == inode, "the user's file is untouched"
    assert sorted(p.name for p in webui.clip.iterdir() if not p.name.startswith(".")) == [name]
    said = [r.message for r in caplog.records if "not the published file" in r.message]
    assert len(said) == 1, f"said once in the console, not {len(said)} times: {said}"


@pytest.mark.parametrize("make, state", [
    (lambda: FILES[T5_FP16], "published"),
    (lambda: safetensors_bytes({k: v.to(torch.bfloat16) for k, v in FP16_STATE.items()}), "own"),
    (lambda: safetensors_bytes(SCALED_FILE), "own"),
    (lambda: FILES[T5_FP16][:-100], "unusable"),  # a cut copy
    (lambda: safetensors_bytes({k: v[..., :1] if k.endswith(".wo.weight") else v for k, v in FP16_STATE.items()}),
     "unusable"),  # another model size
    (lambda: safetensors_bytes({k: v for k, v in FP16_STATE.items() if ".block.2." not in k}), "unusable"),
    (lambda: b"<!DOCTYPE html><html>502 Bad Gateway</html>", "unusable"),
    (None, "missing"),
])
def test_doctor_route_and_webui_agree_on_every_file(webui, mirror, make, state):
    from lib_sd3 import doctor

    webui.shared.cmd_opts.sd3_no_fetch = True
    webui.clip.mkdir(parents=True)
    if make is not None:
        (webui.clip / T5_FP16).write_bytes(make())
    model = load_sd3(webui)
    route = webui.t5.status()["file_states"][T5_FP16]
    verdict = doctor.check_text_encoder(webui.clip, known(T5_FP16)[0], False, t5_layout=encoder_layout_of_stand_in())
    attached = model.cond_stage_model.t5xxl is not None
    assert route["state"] == state
    assert attached == (state in ("published", "own")) == webui.t5.status()["files"][T5_FP16]
    assert verdict.status == {"published": "OK", "own": "OK", "unusable": "FAIL", "missing": "INFO"}[state]


def encoder_layout_of_stand_in():
    from lib_sd3.t5.file_check import encoder_layout

    return encoder_layout(T5_CONFIG)


def test_status_says_which_endpoint_is_tried(webui, mirror):
    mirror.faults.rate = 20_000  # ~1 s: long enough to look
    webui.shared.opts.data["sd3_mirrors"] = f"http://127.0.0.1:9 {mirror.endpoint}"
    load_sd3(webui)
    seen, shown = set(), []
    while not webui.t5.download.wait(0.05):
        progress = webui.t5.status()["progress"] or {}
        seen.add((progress.get("state"), progress.get("endpoint")))
        shown.append(webui.t5.status_markdown())
    assert ("connecting", mirror.endpoint) in seen or ("downloading", mirror.endpoint) in seen
    assert any(f"trying {mirror.endpoint}" in text or f"downloading from {mirror.endpoint}" in text
               for text in shown), "the UI names the endpoint being tried"
    assert webui.t5.status()["fetch_state"] == "done"


# ---------------------------------------------------------------- T5 files under the names users have
COMFY_SCALED = "t5xxl_fp8_e4m3fn_scaled.safetensors"
GOOGLE_FP16 = "google_t5-v1_1-xxl_encoderonly-fp16.safetensors"


def t5_messages(caplog, words):
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_comfyui_scaled_fp8_file_is_attached_and_auto_downloads_nothing(webui, mirror, caplog):
    """64 GB free: fp16 would fit, but the user's fp8 file wins; no 9.8 GB download starts."""
    caplog.set_level("INFO")
    webui.clip.mkdir(parents=True)
    (webui.clip / COMFY_SCALED).write_bytes(safetensors_bytes(SCALED_FILE))
    model = load_sd3(webui)
    out, infotext = generate(webui, model)
    assert infotext == "fp8" and mirror.requests == [] and webui.t5.status()["fetch_state"] == "idle"
    torch.testing.assert_close(out, expected_output(SCALED_MEANT, ["a cat", "sign"]), rtol=1e-3, atol=1e-3)
    status = webui.t5.status()
    assert status["loaded_file"] == COMFY_SCALED and status["precision"] == "fp8 scaled"
    assert status["files"] == {T5_FP16: False, T5_FP8: False, COMFY_SCALED: True}
    assert status["file_states"][COMFY_SCALED]["state"] == "own"
    assert COMFY_SCALED in status["reason"] and "fp16 would fit too" in status["reason"]
    assert f"from {COMFY_SCALED} (fp8 scaled, your own file), the only T5-XXL file here" in status["reason"]
    assert len(t5_messages(caplog, "T5: fp8: needs")) == 1
    assert t5_messages(caplog, f"T5-XXL on (fp8 from {COMFY_SCALED}")
    markdown = webui.t5.status_markdown()
    assert markdown.startswith("**T5-XXL:** fp8 — ") and COMFY_SCALED in markdown
    webui.t5.post_fetch()  # "Download T5 now" under auto: still nothing to fetch
    assert mirror.requests == [] and webui.t5.status()["fetch_state"] == "idle"


def test_file_in_models_text_encoder_under_a_google_name_is_attached(webui, mirror):
    folder = webui.clip.parent / "text_encoder"
    folder.mkdir(parents=True)
    (folder / GOOGLE_FP16).write_bytes(safetensors_bytes({k: v.to(torch.bfloat16) for k, v in FP16_STATE.items()}))
    model = load_sd3(webui)
    out, infotext = generate(webui, model)
    key = f"text_encoder/{GOOGLE_FP16}"
    assert infotext == "fp16" and mirror.requests == []
    assert webui.t5.status()["loaded_file"] == key and webui.t5.status()["files"][key] is True
    torch.testing.assert_close(out, expected_output({k: v.to(torch.bfloat16) for k, v in FP16_STATE.items()},
                                                    ["a cat", "sign"]), rtol=1e-3, atol=1e-3)


def test_asking_for_fp16_with_only_an_fp8_file_fetches_and_a_failure_says_t5_stays_on(webui, mirror, caplog):
    webui.clip.mkdir(parents=True)
    (webui.clip / COMFY_SCALED).write_bytes(safetensors_bytes(SCALED_FILE))
    webui.shared.opts.data["sd3_t5_mode"] = "fp16"
    mirror.faults.status = 404
    model = load_sd3(webui)
    assert webui.t5.download.wait(30)
    assert any(T5_FP16 in path for _, path, _ in mirror.requests), "asked for explicitly: downloaded"
    out, infotext = generate(webui, model)
    assert infotext == "fp8" and webui.t5.status()["fetch_state"] == "failed"
    failed = t5_messages(caplog, "T5 download of")
    assert len(failed) == 1 and f"T5 stays on (fp8 from {COMFY_SCALED})" in failed[0], failed
    assert not t5_messages(caplog, "generating without T5"), "T5 was on: no message may say otherwise"


def test_failed_download_with_nothing_attached_says_generating_without_t5(webui, mirror, caplog):
    mirror.faults.status = 404
    load_sd3(webui)
    assert webui.t5.download.wait(30)
    failed = t5_messages(caplog, "T5 download of")
    assert len(failed) == 1 and "generating without T5" in failed[0]


def test_setting_picks_another_file(webui, mirror):
    webui.clip.mkdir(parents=True)
    (webui.clip / T5_FP16).write_bytes(FILES[T5_FP16])
    (webui.clip / COMFY_SCALED).write_bytes(safetensors_bytes(SCALED_FILE))
    model = load_sd3(webui)
    assert generate(webui, model)[1] == "fp16" and webui.t5.status()["loaded_file"] == T5_FP16
    assert "preferred of 2 T5-XXL files" in webui.t5.status()["reason"]
    webui.shared.opts.data["sd3_t5_file"] = COMFY_SCALED
    out, infotext = generate(webui, model)  # applied at the next generation, like the mode
    assert infotext == "fp8" and webui.t5.status()["loaded_file"] == COMFY_SCALED and mirror.requests == []
    assert "picked in the 'T5-XXL file' setting" in webui.t5.status()["reason"]
    torch.testing.assert_close(out, expected_output(SCALED_MEANT, ["a cat", "sign"]), rtol=1e-3, atol=1e-3)
    webui.shared.opts.data["sd3_t5_file"] = "not-here.safetensors"
    generate(webui, model)
    assert webui.t5.status()["loaded_file"] == T5_FP16 and "not-here.safetensors" in webui.t5.status()["reason"]


def test_odd_files_skipped_with_one_line_and_other_models_in_silence(webui, mirror, caplog):
    webui.clip.mkdir(parents=True)
    (webui.clip / "t5xxl_broken.safetensors").write_bytes(b"<!DOCTYPE html><html>502</html>")
    (webui.clip / "t5_cut.safetensors").write_bytes(FILES[T5_FP16][:-100])
    (webui.clip / "clip_l.safetensors").write_bytes(safetensors_bytes({"text_model.final_layer_norm.weight":
                                                                      torch.ones(4)}))
    (webui.clip / COMFY_SCALED).write_bytes(safetensors_bytes(SCALED_FILE))
    model = load_sd3(webui)
    for _ in range(3):
        generate(webui, model)
        webui.t5.status()
    assert len(t5_messages(caplog, "t5xxl_broken.safetensors: corrupt")) == 1
    assert len(t5_messages(caplog, "t5_cut.safetensors: truncated")) == 1
    assert all("skipped as a T5-XXL file" in m for m in t5_messages(caplog, "t5_cut.safetensors"))
    assert not t5_messages(caplog, "clip_l"), "CLIP-L is not a broken T5"
    files = webui.t5.status()["files"]
    assert files == {T5_FP16: False, T5_FP8: False, "t5_cut.safetensors": False, "t5xxl_broken.safetensors": False,
                     COMFY_SCALED: True}
    assert webui.t5.status()["loaded_file"] == COMFY_SCALED


def test_file_checks_read_headers_only_and_once_per_file_version(webui, monkeypatch):
    from lib_sd3 import safetensors_file

    webui.clip.mkdir(parents=True)
    path = webui.clip / COMFY_SCALED
    path.write_bytes(safetensors_bytes(SCALED_FILE))
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    read = []

    class Counting:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def fileno(self):
            return self.file.fileno()

        def read(self, n=-1):
            data = self.file.read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(safetensors_file, "open", lambda p, mode="r": Counting(open(p, mode)), raising=False)
    assert webui.t5.files.candidates()[0].key == COMFY_SCALED
    assert 0 < sum(read) <= header_bytes < path.stat().st_size, "the header only, never the tensors"
    webui.t5.files.scan()
    webui.t5.status()
    assert sum(read) <= header_bytes, "judged once while the file stays the same"
    path.write_bytes(safetensors_bytes(FP8_STATE))
    assert webui.t5.files.scan()[COMFY_SCALED].precision == "fp8", "a replaced file is judged again"
