"""Build everything a real A1111 needs to load a tiny SD3 model offline. Runs INSIDE A1111's venv.

    <A1111 venv python> tests/webui/build_assets.py --webui ROOT --out DIR

A1111's code imports only in its own venv (its pinned transformers, open-clip, einops ...), so the
test session runs this as a subprocess. Written under DIR:

- ``Stable-diffusion/sd3-tiny.safetensors``: an MMDiT of depth 2 built with A1111's own ``MMDiT``
  class (A1111 infers depth = ``x_embedder.proj.weight.shape[0] // 64``) plus A1111's full-size
  ``SDVAE``, all random.
- ``Stable-diffusion/sd35-large-tiny.safetensors`` (qk-norm, depth 3) and ``sd35-medium-tiny.safetensors``
  (qk-norm + MMDiT-X on block 0, depth 2: same width as sd3-tiny, so SD3 <-> SD3.5 Medium differ only in
  the layout A1111 cannot build), built with the extension's own ``lib_sd3.models.mmdit.MMDiT`` (A1111 has no
  SD3.5 class), qk-norm scales random around 1 so dropping them shows; sd3-tiny's VAE.
  ``sd3-broken-truncated.safetensors``: an SD3-shaped file cut short, for the bad-input case.
- ``ControlNet/sd3.5_large_controlnet_{blur,canny,depth}-tiny.safetensors``: SD3.5 Large ControlNets in
  Stability's released layout at sd35-large-tiny's width (one block), and a truncated one.
  ``ControlNet/sd3_controlnet_pose-tiny.safetensors``: an SD3 Medium ControlNet in diffusers' layout (InstantX's
  form: joint blocks, its own patch / position / text embedding) at sd3-tiny's width (one block).
- ``CLIP/clip_g.safetensors``, ``CLIP/clip_l.safetensors``: random full-size CLIP-G / CLIP-L with the
  key layout of A1111's ``SDXLClipG`` / ``SDClipModel`` (their sizes are hard-coded in A1111, so they
  cannot be shrunk). Both A1111 states load them from ``models/CLIP/`` when the checkpoint lacks them.
- ``VAE-approx/vaeapprox-sd3.pt``: the live-preview model, in torch's legacy (non-zip) pickle format,
  which A1111's restricted unpickler accepts.
- ``hf/hub/...``: an offline Hugging Face cache for ``openai/clip-vit-large-patch14`` (vocab and merges
  derived exactly from open-clip-torch's bundled BPE file, as OpenAI's CLIP tokenizer is; its
  ``tokenizer.json`` converted from them; a default ``config.json``, so the snapshot is complete) and for
  ``google/t5-v1_1-xxl`` (a SMALL sentencepiece model trained here: T5 counts from it are not real T5's).
- ``t5-reduced/t5xxl_fp16.safetensors``: a random T5 encoder with A1111's T5 layout at a reduced size
  (``T5_REDUCED``), for the fetch case; the real one (4096 wide, 24 layers) does not fit in fp32 here.
- ``manifest.json``: what was built, with sizes and sha256 of each file.

Every tensor comes from a fixed seed, so two builds give identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import types
from pathlib import Path

SEED = 20240612
MMDIT_DEPTH = 2
"""Hidden size is 64 * depth (A1111's rule), so depth 2 gives a 128-wide, 2-head MMDiT."""
POS_EMBED_MAX_SIZE = 32
"""Patch grid side: 32 patches of 2 latent pixels of 8 image pixels, so images up to 512 px."""
CONTEXT_WIDTH = 4096
"""A1111 pads CLIP-L+G to 4096 and concatenates T5 (4096) along the token axis."""
ADM_IN_CHANNELS = 2048
"""Pooled CLIP-L (768) + CLIP-G (1280)."""
T5_REDUCED = {"d_ff": 256, "d_model": 4096, "num_heads": 8, "num_layers": 2, "vocab_size": 32128}
"""d_model stays 4096 because A1111 concatenates T5's output with the 4096-padded CLIP context."""
HF_REVISION = "0" * 39 + "1"
"""Any 40-hex name works for a snapshot folder; the cache's refs/main points at it."""
T5_VOCAB_SIZE = 1000
"""Pieces in the stand-in T5 sentencepiece model (real T5: 32000 + 100 extra ids)."""


def _stub_sd_hijack() -> None:
    """dev's other_impls imports ``modules.sd_hijack`` (all of A1111) only for an Embedding subclass.

    The stub gives a plain ``nn.Embedding``: same parameter name and shape, so the state dict keys are
    A1111's own.
    """
    import torch

    stub = types.ModuleType("modules.sd_hijack")

    def TextualInversionEmbeddings(num, dim, dtype=None, device=None, textual_inversion_key=None):  # noqa: N802
        return torch.nn.Embedding(num, dim, dtype=dtype, device=device)

    stub.TextualInversionEmbeddings = TextualInversionEmbeddings
    sys.modules["modules.sd_hijack"] = stub


def _reinit(module, generator) -> dict:
    """Deterministic, variance-preserving random weights: W ~ N(0, 1/fan_in), norms 1, biases 0.

    Some of A1111's parameters are created with ``torch.empty`` (``pos_embed``), so every tensor is
    set here rather than trusting the constructors' initialisation.
    """
    import torch

    state = {}
    for name, tensor in module.state_dict().items():
        if tensor.dim() >= 2:
            fan_in = math.prod(tensor.shape[1:])
            std = 0.02 if ("embedding" in name or name.endswith("pos_embed")) else 1.0 / math.sqrt(fan_in)
            value = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
        elif name.endswith("bias"):
            value = torch.zeros(tensor.shape)
        elif tensor.dim() == 1 and name.endswith("weight"):
            value = torch.ones(tensor.shape)
        else:
            value = tensor.detach().to("cpu", torch.float32).clone()
        state[name] = value
    return state


def _clip_state(config: dict, kind: str, generator) -> dict:
    import torch
    from modules.models.sd3 import other_impls

    with torch.device("meta"), torch.no_grad():
        if kind == "g":
            model = other_impls.SDXLClipG(config, device="meta", dtype=torch.float32)
        else:
            model = other_impls.SDClipModel(
                layer="hidden", layer_idx=-2, device="meta", dtype=torch.float32,
                layer_norm_hidden_state=False, return_projected_pooled=False, textmodel_json_config=config,
            )
    state = _reinit(model.transformer, generator)
    hidden = config["hidden_size"]
    state["text_projection.weight"] = torch.eye(hidden)  # what A1111's constructor sets
    return {k: v.to(torch.float16).contiguous() for k, v in state.items()}


def _sd3_configs(webui: Path) -> tuple[dict, dict]:
    """CLIP-G / CLIP-L configs from whichever module this A1111 state keeps them in (read, not imported)."""
    for module in ("sd3_cond.py", "sd3_model.py"):  # dev / v1.10, then 34b4443c
        path = webui / "modules" / "models" / "sd3" / module
        constants = _load_constants(path) if path.exists() else None
        if constants is not None and hasattr(constants, "CLIPG_CONFIG"):
            return dict(constants.CLIPG_CONFIG), dict(constants.CLIPL_CONFIG)
    raise RuntimeError(f"no CLIPG_CONFIG in {webui}/modules/models/sd3: not an SD3-capable A1111")


def _load_constants(path: Path) -> types.SimpleNamespace:
    """Read the ``*_CONFIG`` dict literals of a module without importing it (it imports all of A1111)."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.endswith("_CONFIG"):
                found[name] = ast.literal_eval(node.value)
    return types.SimpleNamespace(**found)


def build_checkpoint(out: Path, generator) -> Path:
    import torch
    from modules.models.sd3.mmdit import MMDiT
    from modules.models.sd3.sd3_impls import SDVAE
    from safetensors.torch import save_file

    hidden = 64 * MMDIT_DEPTH
    mmdit = MMDiT(
        input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None,
        pos_embed_max_size=POS_EMBED_MAX_SIZE, patch_size=2, in_channels=16, depth=MMDIT_DEPTH,
        num_patches=POS_EMBED_MAX_SIZE ** 2, adm_in_channels=ADM_IN_CHANNELS,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": CONTEXT_WIDTH, "out_features": hidden}},
        device="cpu", dtype=torch.float32,
    )
    state = {f"model.diffusion_model.{k}": v for k, v in _reinit(mmdit, generator).items()}
    vae = SDVAE(device="cpu", dtype=torch.float32)
    state.update({f"first_stage_model.{k}": v for k, v in _reinit(vae, generator).items()})
    path = out / "Stable-diffusion" / "sd3-tiny.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
    return path


SD35_SEED = SEED + 35
SD35_SHAPES = {"sd35-large-tiny": {"depth": 3, "layers": ()}, "sd35-medium-tiny": {"depth": 2, "layers": (0,)}}
TRUNCATED = "sd3-broken-truncated.safetensors"


def build_sd35_checkpoints(out: Path, sd3_checkpoint: Path) -> list[Path]:
    """SD3.5-shaped checkpoints, after everything else so the older files keep their bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lib_sd3.models.families import MMDiTConfig
    from lib_sd3.models.mmdit import MMDiT

    generator = torch.Generator().manual_seed(SD35_SEED)
    vae = {k: v for k, v in load_file(str(sd3_checkpoint)).items() if k.startswith("first_stage_model.")}
    paths = []
    for name, shape in SD35_SHAPES.items():
        config = MMDiTConfig(depth=shape["depth"], patch_size=2, in_channels=16, out_channels=16,
                             pos_embed_max_size=POS_EMBED_MAX_SIZE, context_dim=CONTEXT_WIDTH, adm_dim=ADM_IN_CHANNELS,
                             qk_norm="rms", x_block_self_attn_layers=shape["layers"])
        with torch.device("meta"):
            mmdit = MMDiT(config, dtype=torch.float32)
        state = _reinit(mmdit, generator)
        for key in state:
            if key.endswith((".ln_q.weight", ".ln_k.weight")):
                state[key] = 1 + 0.5 * torch.randn(state[key].shape, generator=generator)
        state = {f"model.diffusion_model.{k}": v for k, v in state.items()}
        state.update(vae)
        path = out / "Stable-diffusion" / f"{name}.safetensors"
        save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
        paths.append(path)
    truncated = out / "Stable-diffusion" / TRUNCATED
    truncated.write_bytes(sd3_checkpoint.read_bytes()[: sd3_checkpoint.stat().st_size * 2 // 3])
    return [*paths, truncated]


CONTROLNET_SEED = SEED + 20
CONTROLNET_BLOCKS = 1
"""sd35-large-tiny has 3 joint blocks: one ControlNet block feeds all three (interval 3; SD3.5 Large: 38 / 19)."""
CONTROLNET_TYPES = {"blur": 0, "canny": 1, "depth": 2}
CONTROLNET_TRUNCATED = "sd3.5_large_controlnet_broken-truncated.safetensors"


def build_sd35_controlnets(out: Path) -> list[Path]:
    """``ControlNet/sd3.5_large_controlnet_{blur,canny,depth}-tiny.safetensors``: Stability's released layout
    (fp32, ``control_type``, the unused ``pos_embed.proj``) at sd35-large-tiny's width, built with the
    extension's ``lib_sd3.controlnet.model.ControlNet``; output layers random (not zero), so they steer.
    sd35-medium-tiny (width 128) is the wrong base for them; plus a truncated one."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lib_sd3.controlnet.detect import ControlNetConfig
    from lib_sd3.controlnet.model import ControlNet

    generator = torch.Generator().manual_seed(CONTROLNET_SEED)
    hidden = 64 * SD35_SHAPES["sd35-large-tiny"]["depth"]
    config = ControlNetConfig(depth=CONTROLNET_BLOCKS, hidden_size=hidden, patch_size=2, in_channels=16,
                              pooled_dim=ADM_IN_CHANNELS)
    folder = out / "ControlNet"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, number in CONTROLNET_TYPES.items():
        with torch.device("meta"):
            model = ControlNet(config, dtype=torch.float32)
        state = _reinit(model, generator)
        state.update({"control_type": torch.tensor([number], dtype=torch.int32),
                      "pos_embed.proj.weight": torch.randn(hidden, 16, 2, 2, generator=generator) * 0.02,
                      "pos_embed.proj.bias": torch.zeros(hidden)})
        path = folder / f"sd3.5_large_controlnet_{kind}-tiny.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        paths.append(path)
    truncated = folder / CONTROLNET_TRUNCATED
    truncated.write_bytes(paths[0].read_bytes()[: paths[0].stat().st_size * 2 // 3])
    return [*paths, truncated]


MEDIUM_CONTROLNET = "sd3_controlnet_pose-tiny.safetensors"


def build_sd3_medium_controlnet(out: Path) -> Path:
    """``ControlNet/sd3_controlnet_pose-tiny.safetensors``: diffusers' names (``transformer_blocks.0.attn.to_q``,
    ``pos_embed.pos_embed``, ...), built with the extension's ``lib_sd3.controlnet.joint.JointControlNet`` and
    written under the file's names its loader reads (q / k / v split back); sd3-tiny's width, one block."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lib_sd3.controlnet.detect import ControlNetConfig
    from lib_sd3.controlnet.joint import JointControlNet, file_names

    generator = torch.Generator().manual_seed(CONTROLNET_SEED + 1)
    config = ControlNetConfig(depth=1, hidden_size=64 * MMDIT_DEPTH, patch_size=2, in_channels=16,
                              pooled_dim=ADM_IN_CHANNELS, context_dim=CONTEXT_WIDTH,
                              pos_embed_max_size=POS_EMBED_MAX_SIZE)
    with torch.device("meta"):
        model = JointControlNet(config, dtype=torch.float32)
    state = {}
    for key, tensor in _reinit(model, generator).items():
        names = file_names(key)
        state.update(zip(names, tensor.chunk(len(names)), strict=True))
    path = out / "ControlNet" / MEDIUM_CONTROLNET
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def build_clip(out: Path, webui: Path, generator) -> list[Path]:
    from safetensors.torch import save_file

    clip_g_config, clip_l_config = _sd3_configs(webui)
    paths = []
    for kind, config in (("g", clip_g_config), ("l", clip_l_config)):
        path = out / "CLIP" / f"clip_{kind}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(_clip_state(config, kind, generator), str(path))
        paths.append(path)
    return paths


def build_reduced_t5(out: Path, generator) -> Path:
    """A random T5 encoder in A1111's ``T5`` layout at ``T5_REDUCED`` size, as a mirror would serve it."""
    import torch
    from modules.models.sd3 import other_impls
    from safetensors.torch import save_file

    with torch.device("meta"), torch.no_grad():
        model = other_impls.T5XXLModel(T5_REDUCED, device="meta", dtype=torch.float32)
    state = {k: v.to(torch.float16).contiguous() for k, v in _reinit(model.transformer, generator).items()}
    path = out / "t5-reduced" / "t5xxl_fp16.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    (path.parent / "config.json").write_text(json.dumps(T5_REDUCED, indent=1), encoding="utf-8")
    return path


def build_vae_approx(out: Path, generator) -> Path:
    import torch
    from torch import nn

    class VAEApprox(nn.Module):  # the layer list of A1111's modules/sd_vae_approx.py, 16 latent channels
        def __init__(self, latent_channels: int = 16):
            super().__init__()
            widths = [latent_channels, 8, 16, 32, 64, 32, 16, 8, 3]
            kernels = [7, 5, 3, 3, 3, 3, 3, 3]
            for i, kernel in enumerate(kernels):
                setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], (kernel, kernel)))

    state = _reinit(VAEApprox(), generator)
    path = out / "VAE-approx" / "vaeapprox-sd3.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path), _use_new_zipfile_serialization=False)
    return path


def _snapshot(hf_home: Path, repo: str) -> Path:
    folder = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(HF_REVISION, encoding="utf-8")
    snapshot = folder / "snapshots" / HF_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def build_clip_tokenizer(hf_home: Path) -> Path:
    # vocab.json / merges.txt from open-clip-torch's bundled BPE, by the extension's own derivation (the suite's
    # oracle is open-clip's SimpleTokenizer, so this is not checked against itself)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lib_sd3.tokens import open_clip_bpe_file, write_clip_vocab

    snapshot = _snapshot(hf_home, "openai/clip-vit-large-patch14")
    write_clip_vocab(open_clip_bpe_file(), snapshot)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (snapshot / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = dict(special, model_max_length=77, do_lower_case=True, errors="replace",
                  tokenizer_class="CLIPTokenizer", add_prefix_space=False)
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    from transformers import CLIPConfig, CLIPTokenizerFast  # the files a complete Hub snapshot also has

    (snapshot / "config.json").write_text(json.dumps(CLIPConfig().to_dict()), encoding="utf-8")
    CLIPTokenizerFast.from_pretrained(str(snapshot)).backend_tokenizer.save(str(snapshot / "tokenizer.json"))
    return snapshot


def _t5_corpus(vocab: dict[str, int]) -> list[str]:
    """Deterministic training text: CLIP's whole-word tokens, 12 to a line, plus the field-notes prompts."""
    words = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha()]
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += [
        'a green sign that says "Very Deep learning" and is at the edge of the Grand Canyon',
        "A portrait photo of a kangaroo wearing an orange hoodie and blue sunglasses",
    ]
    return lines


def build_t5_tokenizer(hf_home: Path) -> Path:
    import io

    import sentencepiece as spm

    snapshot = _snapshot(hf_home, "google/t5-v1_1-xxl")
    vocab = json.loads((_snapshot(hf_home, "openai/clip-vit-large-patch14") / "vocab.json").read_text(encoding="utf-8"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_t5_corpus(vocab)), model_writer=model, vocab_size=T5_VOCAB_SIZE,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    (snapshot / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (snapshot / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = dict(special, extra_ids=100, model_max_length=512, tokenizer_class="T5Tokenizer",
                  note="stand-in built by sd-webui-sd3's tests: NOT the real T5 vocabulary")
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (snapshot / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 32128}), encoding="utf-8")
    from transformers import T5TokenizerFast  # writes tokenizer.json so loading never converts again

    T5TokenizerFast.from_pretrained(str(snapshot)).save_pretrained(str(snapshot))
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webui", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    webui = args.webui.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(webui))
    os.chdir(webui)
    _stub_sd_hijack()

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    generator = torch.Generator().manual_seed(SEED)
    files = [build_checkpoint(out, generator), *build_clip(out, webui, generator),
             build_vae_approx(out, generator), build_reduced_t5(out, generator)]
    files += build_sd35_checkpoints(out, files[0])
    files += build_sd35_controlnets(out)
    files.append(build_sd3_medium_controlnet(out))
    hf_home = out / "hf"
    (hf_home / "hub").mkdir(parents=True, exist_ok=True)
    (hf_home / "hub" / "version.txt").write_text("1", encoding="utf-8")  # transformers 4.30: no cache migration
    build_clip_tokenizer(hf_home)
    build_t5_tokenizer(hf_home)
    manifest = {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(json.dumps(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
