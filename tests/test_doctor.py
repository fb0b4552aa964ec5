"""``python -m lib_sd3 doctor`` on small fake A1111 trees shaped like the real early-SD3 and dev code."""

import dataclasses
import json
import os
import textwrap

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lib_sd3 import cli, doctor, targets
from lib_sd3.doctor import FAIL, INFO, OK, WARN
from lib_sd3.fetch import known_files
from lib_sd3.hashing import sha256_bytes

# --- fake A1111 source, trimmed from the real shapes of both states ------------------------------

SD_HIJACK_DEV = """
class StableDiffusionModelHijack:
    def get_prompt_lengths(self, text):
        if self.clip is None:
            return "-", "-"
        if hasattr(self.clip, 'get_token_count'):
            token_count = self.clip.get_token_count(text)
        else:
            _, token_count = self.clip.process_texts([text])
        return token_count, self.clip.get_target_prompt_token_count(token_count)
"""
SD_HIJACK_EARLY = """
class StableDiffusionModelHijack:
    def get_prompt_lengths(self, text):
        _, token_count = self.clip.process_texts([text])
        return token_count, self.clip.get_target_prompt_token_count(token_count)
"""
SAMPLERS_TIMESTEPS = """
samplers_timesteps = [
    ('DDIM', sd_samplers_timesteps_impl.ddim, ['ddim'], {}),
    ('PLMS', sd_samplers_timesteps_impl.plms, ['plms'], {}),
]
"""
SCHEDULERS = """
schedulers = [
    Scheduler('automatic', 'Automatic', None),
]
"""
SCRIPTS = """
class ScriptRunner:
    pass


class Script:
    def process_before_every_sampling(self, p, *args, **kwargs):
        pass
"""
SD_SAMPLERS = "def create_sampler(name, model):\n    pass\n"
SD_MODELS = "def load_model_weights(model, checkpoint_info, state_dict, timer):\n    pass\n"
MODELLOADER_DEV = "from modules.util import load_file_from_url  # noqa, backwards compatibility\n"
MODELLOADER_EARLY = "def load_file_from_url(\n    url: str,\n    *,\n    model_dir: str,\n) -> str:\n    pass\n"
SD3_COND_DEV = """
class SD3Cond(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    def forward(self, prompts: list[str]):
        pass

    def get_token_count(self, text):
        return self.model_lg.get_token_count(text)
"""
SD3_MODEL_DEV = "class SD3Denoiser(k_diffusion.external.DiscreteSchedule):\n    pass\n\n\nclass SD3Inferencer(torch.nn.Module):\n    pass\n"
SD3_MODEL_EARLY = """
class SD3Cond(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = SD3Tokenizer()

    def forward(self, prompts: list[str]):
        pass


class SD3Denoiser(k_diffusion.external.DiscreteSchedule):
    pass


class SD3Inferencer(torch.nn.Module):
    pass
"""


PROCESSING = ("class StableDiffusionProcessing:\n    pass\n\n\nclass StableDiffusionProcessingImg2Img:\n    pass\n\n\n"
              "def process_images_inner(p):\n    pass\n")


def make_webui(root, state):
    files = {
        "launch.py": "from modules import launch_utils\n",
        "modules/processing.py": PROCESSING,
        "modules/sd_hijack.py": SD_HIJACK_EARLY if state == "early" else SD_HIJACK_DEV,
        "modules/sd_samplers_timesteps.py": SAMPLERS_TIMESTEPS,
        "modules/sd_schedulers.py": SCHEDULERS,
        "modules/scripts.py": SCRIPTS,
        "modules/sd_samplers.py": SD_SAMPLERS,
        "modules/sd_models.py": SD_MODELS,
        "modules/modelloader.py": MODELLOADER_EARLY if state == "early" else MODELLOADER_DEV,
        "modules/api/api.py": "class Api:\n    def init_script_args(self, request, default_script_args):\n        pass\n",
        "modules/options.py": "class Options:\n    def set(self, key, value, is_api=False, run_callbacks=True):\n        pass\n",
        "modules/sd_samplers_cfg_denoiser.py": "class CFGDenoiser:\n    def combine_denoised(self, x_out):\n        pass\n",
        "extensions-builtin/Lora/networks.py": (
            "def load_network(name, network_on_disk):\n    pass\n\n\ndef network_apply_weights(self):\n    pass\n"),
        "extensions-builtin/Lora/ui_extra_networks_lora.py": (
            "class ExtraNetworksPageLora:\n    def create_item(self, name, index=None, enable_filter=True):\n        pass\n"),
    }
    if state == "dev":
        files["modules/models/sd3/sd3_cond.py"] = SD3_COND_DEV
        files["modules/models/sd3/sd3_model.py"] = SD3_MODEL_DEV
    elif state == "early":
        files["modules/models/sd3/sd3_model.py"] = SD3_MODEL_EARLY
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "models" / "CLIP").mkdir(parents=True)
    (root / "extensions").mkdir()
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hub cache that the doctor (and from_pretrained) would use; online."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for var in ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def run_doctor(capsys, *args):
    code = cli.main(["doctor", *map(str, args), "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out else None), out.err


def by_item(report):
    return {(c["section"], c["item"]): c for c in report["checks"]}


# --- state, targets, exit codes ------------------------------------------------------------------

@pytest.mark.parametrize("state, words, cond_file", [
    ("dev", "v1.10", "modules/models/sd3/sd3_cond.py"),
    ("early", "early SD3 branch", "modules/models/sd3/sd3_model.py"),
])
def test_sd3_states_and_targets(tmp_path, hub, capsys, state, words, cond_file):
    root = make_webui(tmp_path / "webui", state)
    code, report, err = run_doctor(capsys, "--webui", root)
    assert code == 0 and report["sd3_can_work"] is True, err
    rows = by_item(report)
    assert rows[("A1111", "SD3 support")]["status"] == OK
    assert words in rows[("A1111", "SD3 support")]["detail"]
    for target in targets.TARGETS:
        row = rows[("patch targets", target.patch)]
        assert row["status"] == OK, row
    assert rows[("patch targets", "t5.sd3_cond")]["detail"].endswith(cond_file)
    assert rows[("patch targets", "samplers.nan_guard")]["detail"].endswith("modules/models/sd3/sd3_model.py")


def test_no_sd3_fails_with_exit_1_and_a_readable_table(tmp_path, hub, capsys):
    root = make_webui(tmp_path / "webui", "none")
    assert cli.main(["doctor", "--webui", str(root)]) == 1
    out = capsys.readouterr().out
    header, rule, *rows = out.split("\n\nSD3 can work")[0].splitlines()
    assert header.split() == ["section", "item", "status", "detail"]
    state_row = next(r for r in rows if r.startswith("A1111"))
    assert " FAIL " in state_row and "update A1111" in state_row
    assert "SD3 can work: no" in out
    # columns line up: every status sits under the "status" header
    column = header.index("status")
    assert all(r[column:].split()[0] in (OK, INFO, WARN, FAIL) for r in rows)


def test_missing_target_is_a_warning_for_that_patch_only(tmp_path, hub, capsys):
    root = make_webui(tmp_path / "webui", "dev")
    (root / "modules/sd_schedulers.py").write_text("def uniform(n):\n    pass\n")
    code, report, _ = run_doctor(capsys, "--webui", root)
    assert code == 0
    statuses = {c["item"]: c["status"] for c in report["checks"] if c["section"] == "patch targets"}
    assert statuses.pop("samplers.schedulers") == WARN
    assert set(statuses.values()) == {OK}


def test_not_a_checkout_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "launch.py").write_text("")  # a launch.py alone is not A1111
    for path in (tmp_path, tmp_path / "nowhere"):
        code, report, err = run_doctor(capsys, "--webui", path)
        assert code == 2 and report is None
        assert len(err.strip().splitlines()) == 1 and str(path) in err


@pytest.mark.parametrize("state", ["dev", "early", "none"])
def test_a1111_state_rule_is_the_same_as_the_running_webuis(sd3_modules, tmp_path, state):
    """The doctor reading a state's source and capabilities() inspecting that state's imported class agree."""
    from lib_sd3.webui import capabilities

    root = make_webui(tmp_path / state, state)
    if state != "none":
        sd3_modules(state)
    expected = {"dev": capabilities.STATE_DEV, "early": capabilities.STATE_EARLY, "none": capabilities.STATE_NONE}
    assert doctor.sd3_state_of(root)[0] == capabilities.a1111_state() == expected[state]


# --- text-encoder files ---------------------------------------------------------------------------

def write_safetensors(path, values=8):
    save_file({"w": np.arange(values, dtype=np.float32), "b": np.ones(3, dtype=np.float16)}, str(path))
    return path.read_bytes()


def loads(path):
    try:
        with safe_open(str(path), "np") as f:
            return len(list(f.keys())) > 0
    except Exception:
        return False


@pytest.fixture
def tiny_known(monkeypatch, tmp_path):
    """Replace the table with files small enough to write: same shape, our own sizes and digests."""
    data = write_safetensors(tmp_path / "reference.safetensors")
    digest = sha256_bytes(data)
    table = tuple(known_files.KnownFile(name, "org/repo", name, len(data), digest, confirmed)
                  for name, confirmed in (("clip_l.safetensors", True), ("clip_g.safetensors", False),
                                          ("t5xxl_fp16.safetensors", True), ("t5xxl_fp8_e4m3fn.safetensors", True)))
    monkeypatch.setattr(known_files, "KNOWN_FILES", table)
    return data


def test_text_encoder_verdicts_agree_with_the_safetensors_loader(tmp_path, hub, capsys, tiny_known):
    root = make_webui(tmp_path / "webui", "dev")
    clip = root / "models" / "CLIP"
    (clip / "clip_l.safetensors").write_bytes(tiny_known)  # the published file
    (clip / "clip_g.safetensors").write_bytes(tiny_known[:-5])  # cut short: a dropped download
    code, report, _ = run_doctor(capsys, "--webui", root)
    rows = by_item(report)
    assert rows[("text encoders", "clip_l.safetensors")]["status"] == OK
    assert loads(clip / "clip_l.safetensors")
    g = rows[("text encoders", "clip_g.safetensors")]
    assert g["status"] == FAIL and "truncated" in g["detail"] and f"{len(tiny_known) - 5:,} of {len(tiny_known):,}" in g["detail"]
    assert not loads(clip / "clip_g.safetensors")
    assert rows[("text encoders", "t5xxl_fp16.safetensors")]["status"] == INFO  # no T5 is allowed
    assert code == 1 and report["sd3_can_work"] is False


def test_t5_files_under_other_names_are_listed_like_the_webui_sees_them(tmp_path):
    """ComfyUI / google names in models/CLIP or models/text_encoder: the same header rule as the WebUI's."""
    from lib_sd3.t5.file_check import encoder_layout

    config = {"d_ff": 8, "d_model": 4, "num_heads": 2, "num_layers": 2, "vocab_size": 10}
    layout = encoder_layout(config)
    models = tmp_path / "models"
    (models / "CLIP").mkdir(parents=True)
    (models / "text_encoder").mkdir()
    t5 = {key: np.zeros(shape, np.float16) for key, shape in layout.items()}
    save_file(t5, str(models / "CLIP" / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    save_file(t5, str(models / "text_encoder" / "google_t5-v1_1-xxl_encoderonly-fp16.safetensors"))
    save_file({"text_model.final_layer_norm.weight": np.ones(4, np.float16)}, str(models / "CLIP" / "other.safetensors"))
    (models / "CLIP" / "t5_cut.safetensors").write_bytes((models / "CLIP" / "t5xxl_fp8_e4m3fn_scaled.safetensors")
                                                         .read_bytes()[:-7])
    rows = {c.item: c for c in doctor.check_other_t5_files(models, layout)}
    assert set(rows) == {"CLIP/t5xxl_fp8_e4m3fn_scaled.safetensors", "CLIP/t5_cut.safetensors",
                         "text_encoder/google_t5-v1_1-xxl_encoderonly-fp16.safetensors"}, "CLIP-L is not listed"
    assert rows["CLIP/t5xxl_fp8_e4m3fn_scaled.safetensors"].status == OK
    assert "may pick it for T5" in rows["text_encoder/google_t5-v1_1-xxl_encoderonly-fp16.safetensors"].detail
    assert rows["CLIP/t5_cut.safetensors"].status == WARN and "truncated" in rows["CLIP/t5_cut.safetensors"].detail


@pytest.mark.parametrize("content, words", [
    (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "not a safetensors file"),
    (b"\0" * 4096, "not a safetensors file"),  # a pre-allocated file never written
    (b"\x10\0", "shorter than a safetensors header"),
])
def test_not_safetensors_at_all_is_corrupt(tmp_path, content, words):
    path = tmp_path / "clip_l.safetensors"
    path.write_bytes(content)
    check = doctor.check_text_encoder(tmp_path, known_files.sources("clip_l.safetensors")[0], False)
    assert check.status == FAIL and words in check.detail
    assert not loads(path)


def test_trailing_bytes_are_corrupt_like_the_loader_says(tmp_path, tiny_known):
    path = tmp_path / "clip_l.safetensors"
    path.write_bytes(tiny_known + b"\0" * 7)
    check = doctor.check_text_encoder(tmp_path, known_files.KNOWN_FILES[0], False)
    assert check.status == FAIL and "7 bytes beyond" in check.detail
    assert not loads(path)


def test_unreadable_file_is_reported_not_raised(tmp_path, tiny_known, monkeypatch):
    (tmp_path / "clip_l.safetensors").write_bytes(tiny_known)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(doctor, "safetensors_extent", denied)
    check = doctor.check_text_encoder(tmp_path, known_files.KNOWN_FILES[0], False)
    assert check.status == FAIL and "Permission denied" in check.detail


def test_broken_sd3_source_is_reported(tmp_path):
    root = make_webui(tmp_path / "webui", "dev")
    (root / "modules/models/sd3/sd3_cond.py").write_text("class SD3Cond(:\n")
    state, detail = doctor.sd3_state_of(root)
    assert state == "no-sd3" and "does not parse" in detail and "line 1" in detail


def test_safetensors_extent_is_the_file_size_of_a_valid_file(tmp_path):
    for values in (1, 100, 12345):
        data = write_safetensors(tmp_path / f"{values}.safetensors", values)
        assert doctor.safetensors_extent(tmp_path / f"{values}.safetensors") == len(data)


def test_hash_verdicts(tmp_path, tiny_known):
    clip = tmp_path
    flipped = bytearray(tiny_known)
    flipped[-1] ^= 0xFF  # same size, header intact, one tensor byte wrong
    l_file, g_file = known_files.KNOWN_FILES[0], known_files.KNOWN_FILES[1]
    (clip / "clip_l.safetensors").write_bytes(tiny_known)
    assert doctor.check_text_encoder(clip, l_file, True).status == OK
    assert "sha256 matches" in doctor.check_text_encoder(clip, l_file, True).detail
    (clip / "clip_l.safetensors").write_bytes(bytes(flipped))
    assert doctor.check_text_encoder(clip, l_file, False).status == OK  # size alone cannot see it
    bad = doctor.check_text_encoder(clip, l_file, True)
    assert bad.status == FAIL and sha256_bytes(flipped)[:12] in bad.detail
    (clip / "clip_g.safetensors").write_bytes(bytes(flipped))
    unconfirmed = doctor.check_text_encoder(clip, g_file, True)
    assert unconfirmed.status == WARN and "unconfirmed" in unconfirmed.detail  # never FAIL on an unconfirmed digest


def test_a_different_but_valid_file_is_a_warning(tmp_path, tiny_known):
    write_safetensors(tmp_path / "clip_l.safetensors", values=20)
    check = doctor.check_text_encoder(tmp_path, known_files.KNOWN_FILES[0], True)
    assert check.status == WARN and "not the published file" in check.detail


def test_known_files_table_is_well_formed():
    assert set(known_files.TEXT_ENCODER_FILES) == {"clip_l.safetensors", "clip_g.safetensors",
                                                   "t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors"}
    for name in known_files.TEXT_ENCODER_FILES:
        rows = known_files.sources(name)
        assert len({(f.size, f.sha256) for f in rows}) == 1, f"{name}: sources disagree on the bytes"
        assert len(rows[0].sha256) == 64 and int(rows[0].sha256, 16) >= 0 and rows[0].size > 0
    # the fp8 file is about half the fp16 one (1 byte vs 2 per weight, same header)
    fp16, fp8 = known_files.sources("t5xxl_fp16.safetensors")[0], known_files.sources("t5xxl_fp8_e4m3fn.safetensors")[0]
    assert abs(fp8.size / fp16.size - 0.5) < 0.01
    assert not any(f.confirmed for f in known_files.sources("clip_g.safetensors"))
    # A1111 downloads from this repo first; the table must name it first
    assert known_files.sources("clip_g.safetensors")[0].repo == "AUTOMATIC/stable-diffusion-3-medium-text-encoders"


# --- tokenizer caches -------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, "HOME/.cache/huggingface/hub"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/huggingface/hub"),
    ({"HF_HOME": "/hf", "XDG_CACHE_HOME": "/xdg"}, "/hf/hub"),
    ({"HF_HUB_CACHE": "/hub", "HF_HOME": "/hf"}, "/hub"),
    ({"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/hf"}, "/legacy"),
    ({"TRANSFORMERS_CACHE": "/tc", "HF_HUB_CACHE": "/hub"}, "/tc"),
])
def test_hub_cache_dir_precedence(tmp_path, env, expected):
    assert str(doctor.hub_cache_dir(env, tmp_path)) == expected.replace("HOME", str(tmp_path))


def cache_repo(cache, repo, files, revision="0123456789abcdef", blobs=True):
    base = cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir(exist_ok=True)
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(revision)  # from_pretrained offline finds a snapshot through its ref
    for name in files:
        blob = base / "blobs" / sha256_bytes(name.encode())
        if blobs:
            blob.write_text(name)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)  # as huggingface_hub lays it out


def test_tokenizer_cache_complete_incomplete_and_offline(tmp_path, hub, capsys, monkeypatch):
    root = make_webui(tmp_path / "webui", "dev")
    cache_repo(hub, "openai/clip-vit-large-patch14", ["vocab.json", "merges.txt", "tokenizer_config.json"])
    cache_repo(hub, "google/t5-v1_1-xxl", ["spiece.model"], blobs=False)  # snapshot links to blobs never written
    code, report, _ = run_doctor(capsys, "--webui", root)
    rows = by_item(report)
    assert rows[("tokenizers", "openai/clip-vit-large-patch14")]["status"] == OK
    t5 = rows[("tokenizers", "google/t5-v1_1-xxl")]
    assert t5["status"] == WARN and "incomplete" in t5["detail"] and str(hub) in t5["detail"]
    assert code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, report, _ = run_doctor(capsys, "--webui", root)
    assert by_item(report)[("tokenizers", "google/t5-v1_1-xxl")]["status"] == FAIL and code == 1


def test_tokenizer_files_are_ones_the_tokenizers_read():
    """Required files are among those transformers' tokenizer classes read (oracle: their own tables).

    A1111 uses the slow CLIPTokenizer (vocab.json + merges.txt) and T5TokenizerFast, which builds
    itself from spiece.model when the repo has no tokenizer.json (google/t5-v1_1-xxl has none).
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = set(known_files.TOKENIZER_ESSENTIALS["openai/clip-vit-large-patch14"])
    assert clip == {"vocab.json", "merges.txt"} and clip <= set(CLIPTokenizer.vocab_files_names.values())
    t5 = set(known_files.TOKENIZER_ESSENTIALS["google/t5-v1_1-xxl"])
    assert t5 == {"spiece.model"} and t5 <= set(T5TokenizerFast.vocab_files_names.values())


# --- IC-Light --------------------------------------------------------------------------------------

ICLIGHT_OLD = textwrap.dedent("""
    class ICLightScript(scripts.Script):
        def process(self, p, *args, **kwargs):
            if self.backend_type != BackendType.A1111:
                return
            self.apply_ic_light(p, ICLightArgs.fetch_from(p))

        def process_before_every_sampling(self, p, *args, **kwargs):
            assert self.backend_type == BackendType.Forge
            args = ICLightArgs.fetch_from(p)
            if not args.enabled:
                return
            self.apply_ic_light(p, args)
""")
ICLIGHT_NEW = textwrap.dedent("""
    class ICLightScript(scripts.Script):
        def process_before_every_sampling(self, p, *args, **kwargs):
            if self.backend_type == BackendType.A1111:
                return
            if (self.args is None) or (not self.args.enabled):
                return
            self.apply_ic_light(p, self.args)
""")
ICLIGHT_HAOMING = textwrap.dedent("""
    backend_type, apply_ic_light = detect_backend()

    class ICLightScript(scripts.Script):
        def process_before_every_sampling(self, p, *args, **kwargs):
            if self.args is not None:
                apply_ic_light(p, self.args)
""")


def add_extension(root, name, scripts=None, packages=()):
    folder = root / "extensions" / name
    (folder / "scripts").mkdir(parents=True)
    for file, source in (scripts or {}).items():
        (folder / "scripts" / file).write_text(source)
    for package in packages:
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text("")


@pytest.mark.parametrize("name, scripts, packages, status, words", [
    ("sd-webui-ic-light", {"ic_light_script.py": ICLIGHT_OLD}, ("libiclight",), WARN, "asserts Forge"),
    ("sd-forge-ic-light", {"ic_light_script.py": ICLIGHT_NEW}, ("libiclight",), OK, "new version"),
    ("sd-forge-ic-light", {"ic_light_script.py": ICLIGHT_HAOMING}, ("lib_iclight",), OK, "new version"),
    ("my-relight", {"relight.py": ICLIGHT_OLD}, ("lib_iclight",), WARN, "asserts Forge"),  # renamed folder
])
def test_iclight_versions(tmp_path, name, scripts, packages, status, words):
    root = make_webui(tmp_path / "webui", "dev")
    add_extension(root, name, scripts, packages)
    add_extension(root, "sd-webui-controlnet", {"controlnet.py": ICLIGHT_NEW.replace("apply_ic_light", "x")})
    checks = {c.item: c for c in doctor.check_iclight(root)}
    assert set(checks) == {name, "sd-webui-model-patcher"}  # controlnet is not mistaken for IC-Light
    assert checks[name].status == status and words in checks[name].detail
    assert checks["sd-webui-model-patcher"].status == WARN


def test_iclight_absent_patcher_present_and_disabled(tmp_path):
    root = make_webui(tmp_path / "webui", "dev")
    assert [dataclasses.astuple(c) for c in doctor.check_iclight(root)] == [
        ("IC-Light", "IC-Light", INFO, "not installed")]
    add_extension(root, "sd-webui-ic-light", {"ic_light_script.py": ICLIGHT_OLD}, ("libiclight",))
    add_extension(root, "sd-webui-model-patcher", {}, ("lib_modelpatcher",))
    (root / "config.json").write_text(json.dumps({"disabled_extensions": ["sd-webui-ic-light"]}))
    checks = {c.item: c for c in doctor.check_iclight(root)}
    assert checks["sd-webui-model-patcher"].status == OK
    assert "disabled in config.json" in checks["sd-webui-ic-light"].detail


def test_iclight_shape_parses_only_the_hook():
    assert doctor.iclight_shape(ICLIGHT_OLD) == doctor.ICLIGHT_OLD
    assert doctor.iclight_shape(ICLIGHT_NEW) == doctor.ICLIGHT_NEW
    assert doctor.iclight_shape("class S:\n    def process(self, p):\n        assert Forge\n") is None
    assert doctor.iclight_shape("class S:\n    def process_before_every_sampling(self, p):\n        pass\n") == (
        doctor.ICLIGHT_UNKNOWN)


def test_every_registered_patch_has_exactly_one_source_target(fake_webui):
    """The doctor checks what the running WebUI patches: one row per registry patch, same names."""
    import importlib

    from lib_sd3.webui import startup
    from lib_sd3.webui.registry import REGISTRY

    for name in startup.FEATURE_MODULES:
        startup.register(importlib.import_module(name).DECLARED)
    feature_patches = {p.name for p in REGISTRY if not p.name.startswith("test_")}  # test_*: stand-in features
    rows = [t.patch for t in targets.TARGETS]
    assert len(rows) == len(set(rows))
    assert set(rows) == feature_patches
