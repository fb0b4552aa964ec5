"""lib_sd3.t5: precision choice, fp8 weights kept fp8, tokenizer cache layout (T5's NaN guard: test_nan_guard.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lib_sd3 import t5
from lib_sd3.fetch import FetchOptions, cache, fetch_tokenizer
from lib_sd3.fetch.known_files import T5_FP8, T5_FP16, sources
from lib_sd3.t5.plan import Candidate, plan_t5

GIB = 1 << 30
FP16, FP8 = t5.RESIDENT_BYTES["fp16"], t5.RESIDENT_BYTES["fp8"]


# ------------------------------------------------------------------------------------------- mode choice
@pytest.mark.parametrize("requested, ram, vram, expected", [
    ("auto", 24 * GIB, None, "fp16"),  # the 24 GB CPU machine: fp16 fits when kept in fp16
    ("auto", FP16 + t5.HEADROOM_BYTES, None, "fp16"),  # exactly enough
    ("auto", FP16 + t5.HEADROOM_BYTES - 1, None, "fp8"),  # one byte short of fp16
    ("auto", FP8 + t5.HEADROOM_BYTES - 1, None, "off"),  # not even fp8
    ("auto", 64 * GIB, 8 * GIB, "fp8"),  # an 8 GB GPU: fp8 only
    ("auto", 64 * GIB, 6 * GIB, "off"),  # a 6 GB GPU: no T5
    ("auto", 6 * GIB, 24 * GIB, "off"),  # a big GPU but T5 is built in RAM first
    ("fp16", 64 * GIB, 8 * GIB, "off"),  # requested but cannot fit: never switched on
    ("fp8", 64 * GIB, 8 * GIB, "fp8"),
    ("off", 512 * GIB, None, "off"),
])
def test_choose_mode(requested, ram, vram, expected):
    choice = t5.choose_mode(requested, ram, vram)
    assert choice.mode == expected
    assert f"{ram / 1e9:.1f} GB free RAM" in choice.reason or requested == "off"


def test_resident_sizes_match_the_published_files():
    """The T5-XXL shape accounts for both files to within their small tensors (norms, bias, header):
    fp16 file = Linear x 2 B + embedding twice (shared + encoder) x 2 B; fp8 file = Linear x 1 B +
    embedding once x 2 B. Attached, the embedding is fp32 once."""
    linear, embed = t5.XXL_LINEAR_PARAMS, t5.XXL_EMBED_PARAMS
    assert abs(linear * 2 + embed * 2 * 2 - sources(T5_FP16)[0].size) < 1e6
    assert abs(linear + embed * 2 - sources(T5_FP8)[0].size) < 1e6
    assert FP16 == linear * 2 + embed * 4 and FP8 == linear + embed * 4


def test_choose_mode_says_why_and_rejects_unknown():
    assert "try fp8" in t5.choose_mode("fp16", 64 * GIB, 8 * GIB).reason
    with pytest.raises(ValueError, match="allowed"):
        t5.choose_mode("fp4", GIB, None)


def present_files(names) -> list[Candidate]:
    """The published files on disk, as the WebUI's file scan reports them."""
    return [Candidate(name, Path("models/CLIP") / name, "fp8" if name == T5_FP8 else "fp16", True)
            for name in (T5_FP16, T5_FP8) if name in names]


@pytest.mark.parametrize("mode, present, expected", [  # (file loaded, fp8, file fetched)
    ("off", {T5_FP16}, (None, False, None)),
    ("fp8", set(), (None, True, T5_FP8)),
    ("fp8", {T5_FP16}, (T5_FP16, True, None)),  # no download: rounded at load
    ("fp8", {T5_FP8, T5_FP16}, (T5_FP8, True, None)),
    ("fp16", {T5_FP8}, (T5_FP8, True, T5_FP16)),  # fp8 meanwhile, fp16 fetched: asked for explicitly
    ("fp16", {T5_FP16}, (T5_FP16, False, None)),
    ("fp16", set(), (None, False, T5_FP16)),
])
def test_plan_files(mode, present, expected):
    plan = plan_t5(mode, present_files(present), 512 * GIB, None)
    assert (plan.load.key if plan.load else None, plan.fp8, plan.fetch) == expected


def test_free_memory_reports_plausible_ram():
    ram, vram = t5.free_memory()
    assert 0 < ram < 1 << 50
    assert vram is None or vram >= 0


# ------------------------------------------------------------------------------------------ fp8 weights
def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=160, num_layers=3, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def fp16_file_state() -> dict[str, torch.Tensor]:
    """What a t5xxl_fp16 file holds: every tensor in fp16 (T5's own initialisation scale)."""
    return {k: v.to(torch.float16) for k, v in tiny_t5().state_dict().items()}


def encode(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float()


IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))


def test_fp8_weights_stay_fp8_and_match_fp8_rounding_exactly():
    state = fp16_file_state()
    ours = tiny_t5(1)  # other random weights: everything must come from the file
    t5.load_keeping_dtypes(ours, state, fp8=True)
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {m.weight.dtype for n, m in linears.items() if not n.endswith(".wo")} == {torch.float8_e4m3fn}
    assert {m.weight.dtype for n, m in linears.items() if n.endswith(".wo")} == {torch.float32}

    # Oracle: a plain fp32 model whose Linear weights were rounded to fp8 and back, loaded the usual way.
    oracle = tiny_t5(2)
    rounded = {k: v.float() for k, v in state.items()}
    for name in linears:
        if not name.endswith(".wo"):
            rounded[f"{name}.weight"] = rounded[f"{name}.weight"].to(torch.float8_e4m3fn).float()
    oracle.load_state_dict(rounded, strict=False)
    torch.testing.assert_close(encode(ours, IDS), encode(oracle, IDS), rtol=1e-5, atol=1e-5)


def test_fp8_embeddings_close_to_fp16_and_half_the_linear_bytes():
    state = fp16_file_state()
    reference = tiny_t5(1)
    t5.load_keeping_dtypes(reference, state, fp8=False)  # fp16 weights, upcast per layer
    ours = tiny_t5(1)
    t5.load_keeping_dtypes(ours, state, fp8=True)
    ref, got = encode(reference, IDS), encode(ours, IDS)
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1)).min().item()
    relative = ((got - ref).norm() / ref.norm()).item()
    # fp8 e4m3 keeps 3 mantissa bits: each weight is off by up to 2^-4 relative, ~3.6 % RMS, and the
    # errors of 3 blocks add up. Measured here: cosine 0.9985, relative error 5.1 %.
    assert cosine > 0.99 and relative < 0.1, (cosine, relative)

    # Memory, counted independently: fp8 Linear weights 1 byte, fp16 ones 2, everything else as the model holds it.
    def expected_bytes(model, linear_bytes: int) -> int:
        total = 0
        linear_keys = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                       and not n.endswith(".wo")}
        for key, tensor in model.state_dict(keep_vars=True).items():
            if key == "shared.weight" or (key == "encoder.embed_tokens.weight" and tensor is model.shared.weight):
                continue
            total += tensor.numel() * (linear_bytes if key in linear_keys else 4)
        return total + model.shared.weight.numel() * 4

    assert t5.parameter_bytes(ours) == expected_bytes(ours, 1)
    assert t5.parameter_bytes(reference) == expected_bytes(reference, 2)
    assert t5.parameter_bytes(ours) < t5.parameter_bytes(reference)


def test_fp16_file_loaded_into_fp32_model_stays_fp16():
    """The 24 GB CPU case: A1111 builds T5 in fp32; loading keeps the file's fp16 (half of fp32)."""
    model = tiny_t5(1)
    before = t5.parameter_bytes(model)
    t5.load_keeping_dtypes(model, fp16_file_state(), fp8=False)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith(".wo")]
    assert {m.weight.dtype for m in linear} == {torch.float16}
    assert t5.parameter_bytes(model) < before
    assert torch.isfinite(encode(model, IDS)).all()


# ------------------------------------------------------------------------------------------- tokenizers
def test_repo_folder_and_local_commit():
    assert cache.repo_folder(Path("/c"), "google/t5-v1_1-xxl") == Path("/c/models--google--t5-v1_1-xxl")
    commit = cache.local_commit("a/b")
    assert len(commit) == 40 and commit == cache.local_commit("a/b") != cache.local_commit("a/c")


def _clip_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """A tiny but real CLIP BPE tokenizer: the files openai/clip-vit-large-patch14 ships, made small."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    if not (folder / "special_tokens_map.json").exists():  # newer transformers no longer write it; the Hub has it
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_tokenizer_lands_where_from_pretrained_finds_it_offline(tmp_path, monkeypatch):
    from hf_mirror import HFMirror

    from lib_sd3.fetch.known_files import CLIP_TOKENIZER_REPO, tokenizer_files

    made = tmp_path / "made"
    made.mkdir()
    files = _clip_tokenizer_files(made)
    hub = tmp_path / "hub"
    with HFMirror() as mirror:
        mirror.faults.lfs = False  # small git files: verified by their git blob id
        for known in tokenizer_files(CLIP_TOKENIZER_REPO):
            assert known.path in files, f"{known.path} is what from_pretrained reads; the fake must have it"
            mirror.add(CLIP_TOKENIZER_REPO, known.path, files[known.path])
        snapshot = fetch_tokenizer(CLIP_TOKENIZER_REPO, FetchOptions(endpoints=[mirror.endpoint], backoff=0.01),
                                   cache=hub)
        served = len(mirror.requests)
        again = fetch_tokenizer(CLIP_TOKENIZER_REPO, FetchOptions(endpoints=[mirror.endpoint]), cache=hub)
        assert again == snapshot and len(mirror.requests) == served, "a complete snapshot is not fetched again"
    assert snapshot.name == "0123456789abcdef0123456789abcdef01234567"  # the server's X-Repo-Commit
    # A fresh process, offline, loading by repo id exactly as A1111 does.
    code = textwrap.dedent(f"""
        from transformers import CLIPTokenizer
        tok = CLIPTokenizer.from_pretrained({CLIP_TOKENIZER_REPO!r})
        print(tok("abc")["input_ids"])
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    from transformers import CLIPTokenizer

    assert out.stdout.strip() == str(CLIPTokenizer.from_pretrained(str(made))("abc")["input_ids"])


def test_tokenizer_offline_without_cache_says_how_to_get_it(tmp_path):
    from lib_sd3.fetch import FetchOffline
    from lib_sd3.fetch.known_files import T5_TOKENIZER_REPO

    with pytest.raises(FetchOffline, match="spiece.model|config.json"):
        fetch_tokenizer(T5_TOKENIZER_REPO, FetchOptions(endpoints=["http://127.0.0.1:9"], offline=True),
                        cache=tmp_path)
