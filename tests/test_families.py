"""Family detection from keys and shapes, and the clear errors for checkpoints that fit no family."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save_file

from lib_sd3.models.families import CheckpointError, detect, detect_file, read_checkpoint_header
from lib_sd3.models.mmdit_load import KeyMismatchError, expected_shapes
from tests import tiny_sd35


def _shapes(family: str, depth: int = 3) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tiny_sd35.stability_checkpoint(tiny_sd35.diffusers_model(family, 0, depth)).items()}


@pytest.fixture(scope="module")
def shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: _shapes(name) for name in tiny_sd35.SHAPES}


def test_each_family_and_its_config(shapes):
    medium = detect(shapes["sd3-medium"])
    assert (medium.name, medium.label, medium.config.qk_norm, medium.needs_our_mmdit) == \
        ("sd3-medium", "SD3 Medium", None, False)
    large = detect(shapes["sd3.5-large"])
    assert (large.name, large.config.qk_norm, large.config.x_block_self_attn_layers) == ("sd3.5-large", "rms", ())
    sd35m = detect(shapes["sd3.5-medium"])
    assert (sd35m.name, sd35m.label, sd35m.config.x_block_self_attn_layers) == ("sd3.5-medium", "SD3.5 Medium", (0, 1))
    config = sd35m.config
    assert (config.depth, config.hidden_size, config.patch_size, config.in_channels, config.out_channels,
            config.pos_embed_max_size, config.context_dim, config.adm_dim) == (3, 192, 2, 16, 16, 12, 48, 40)
    assert expected_shapes(config) == {k[len(sd35m.prefix):]: v for k, v in shapes["sd3.5-medium"].items()}


def test_turbo_only_from_metadata_or_file_name(shapes):
    large = shapes["sd3.5-large"]
    assert detect(large, {"modelspec.title": "Stable Diffusion 3.5 Large Turbo"}).name == "sd3.5-large-turbo"
    assert detect(large, {}, "/m/sd3.5_large_turbo.safetensors").turbo_from == "file name"
    assert detect(large, {"modelspec.title": "SD3.5 Large"}, "large.safetensors").name == "sd3.5-large"
    # the name never changes the architecture: an SD3 Medium file called "turbo" is SD3 Medium
    assert detect(shapes["sd3-medium"], {}, "turbo.safetensors").name == "sd3-medium"


def test_bare_mmdit_keys_and_non_sd3(shapes):
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in shapes["sd3.5-large"].items()}
    assert detect(bare).prefix == ""
    assert detect({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) is None


def test_mmdit_x_holes_are_a_clear_error(shapes):
    holed = {k: v for k, v in _shapes("sd3.5-medium").items() if ".1.x_block.attn2." not in k}
    holed.update({k.replace("joint_blocks.0.", "joint_blocks.2."): v for k, v in holed.items()
                  if k.startswith("model.diffusion_model.joint_blocks.0.x_block.attn2.")})
    with pytest.raises(CheckpointError, match=r"MMDiT-X layers \[0, 2\] have holes .*blocks \[1\]"):
        detect(holed, filename="holed.safetensors")


def test_unknown_sd3_layouts_are_clear_errors(shapes):
    no_qk = {k: v for k, v in shapes["sd3.5-medium"].items() if ".ln_q." not in k and ".ln_k." not in k}
    with pytest.raises(CheckpointError, match="MMDiT-X blocks without qk-norm"):
        detect(no_qk)
    partial_qk = {k: v for k, v in shapes["sd3.5-large"].items() if not k.startswith("model.diffusion_model.joint_blocks.2.")
                  or ".ln_" not in k}
    with pytest.raises(CheckpointError, match="qk-norm weights in joint blocks"):
        detect(partial_qk)
    wide = dict(shapes["sd3-medium"])
    wide["model.diffusion_model.x_embedder.proj.weight"] = (200, 16, 2, 2)
    with pytest.raises(CheckpointError, match="width 200 with 3 joint blocks"):
        detect(wide)
    gap = {k: v for k, v in shapes["sd3-medium"].items() if ".joint_blocks.1." not in k}
    with pytest.raises(CheckpointError, match=r"joint blocks \[1\] are missing"):
        detect(gap)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_header_is_read_without_tensors_and_truncation_is_named(tmp_path):
    path = tmp_path / "sd35m.safetensors"
    tiny_sd35.write_checkpoint(path, "sd3.5-medium", metadata={"modelspec.title": "x"})
    header = read_checkpoint_header(path)
    assert header.metadata == {"modelspec.title": "x"} and header.extent == path.stat().st_size
    assert detect_file(path).name == "sd3.5-medium"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated: .* its header promises"):
        detect_file(cut)
    with pytest.raises(CheckpointError, match="truncated"):
        tiny_sd35.load_mmdit(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"{not json at all....")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_checkpoint_header(garbage)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="shorter than a safetensors header"):
        read_checkpoint_header(tmp_path / "empty.safetensors")


def test_missing_or_extra_keys_name_the_family_and_keys(tmp_path):
    tensors = tiny_sd35.stability_checkpoint(tiny_sd35.diffusers_model("sd3.5-large"))
    dropped = dict(tensors)
    del dropped["model.diffusion_model.joint_blocks.1.x_block.mlp.fc1.bias"]
    with pytest.raises(KeyMismatchError, match=r"SD3.5 Large checkpoint does not fit its MMDiT: 1 missing "
                                                r"\(first: model.diffusion_model.joint_blocks.1.x_block.mlp.fc1.bias\)"):
        tiny_sd35.load_mmdit(_write(tmp_path / "dropped.safetensors", dropped))
    extra = dict(tensors)
    extra["model.diffusion_model.joint_blocks.0.x_block.attn.extra"] = torch.zeros(2)
    with pytest.raises(KeyMismatchError, match="1 unexpected"):
        tiny_sd35.load_mmdit(_write(tmp_path / "extra.safetensors", extra))
