"""ControlNet files: detected from the header, refused in one line when unusable, loaded whole or not at all."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lib_sd3.controlnet.detect import (
    STABILITY_TYPES,
    ControlNetConfig,
    ControlNetError,
    check_base,
    config_from_shapes,
    inspect,
)
from lib_sd3.controlnet.load import load_controlnet
from lib_sd3.controlnet.model import ControlNet
from lib_sd3.models.families import MMDiTConfig
from tests import tiny_controlnet

# the real families' shapes (Stability's files): SD3.5 Large 38 blocks, SD3.5 Medium 24 with MMDiT-X 0..12
SD35_LARGE = MMDiTConfig(depth=38, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=192,
                         context_dim=4096, adm_dim=2048, qk_norm="rms")
SD35_MEDIUM = MMDiTConfig(depth=24, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=384,
                          context_dim=4096, adm_dim=2048, qk_norm="rms", x_block_self_attn_layers=tuple(range(13)))
LARGE_CONTROLNET = ControlNetConfig(depth=19, hidden_size=2432, patch_size=2, in_channels=16, pooled_dim=2048)


def released_shapes(config: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    """The header of a released file for ``config`` (from a model on the meta device)."""
    shapes = {k: tuple(v.shape) for k, v in ControlNet(config, device="meta").state_dict().items()}
    shapes.update({"control_type": (1,), "pos_embed.proj.weight": (config.hidden_size, 16, 2, 2),
                   "pos_embed.proj.bias": (config.hidden_size,)})
    return shapes


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("control_type", STABILITY_TYPES)
def test_each_type_is_read_from_the_file(tmp_path, control_type):
    path = tmp_path / f"{control_type.label}.safetensors"
    tiny_controlnet.write_controlnet(path, control_type=int(control_type))
    file = inspect(path)
    assert file.control_type is control_type
    assert file.config == ControlNetConfig(depth=2, hidden_size=256, patch_size=2, in_channels=16, pooled_dim=40)


def test_released_large_layout_fits_large_and_not_medium():
    config = config_from_shapes(released_shapes(LARGE_CONTROLNET))
    assert config == LARGE_CONTROLNET and config.num_heads == 38
    check_base(config, SD35_LARGE, "SD3.5 Large")
    with pytest.raises(ControlNetError) as error:
        check_base(config, SD35_MEDIUM, "SD3.5 Medium", "sd3.5_large_controlnet_canny.safetensors")
    text = one_line(error.value)
    assert "SD3.5 Large" in text and "SD3.5 Medium" in text and "width 2432 vs 1536" in text


def test_block_count_that_does_not_divide_the_base_is_refused():
    with pytest.raises(ControlNetError, match="3 ControlNet blocks do not divide 4 joint blocks"):
        check_base(ControlNetConfig(depth=3, hidden_size=256, patch_size=2, in_channels=16, pooled_dim=40),
                   MMDiTConfig(depth=4, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=12,
                               context_dim=48, adm_dim=40, qk_norm="rms"), "tiny")


def test_other_files_are_named_not_an_sd3_controlnet(tmp_path):
    sd15 = tmp_path / "control_v11p_sd15_canny.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, str(sd15))
    base = tmp_path / "sd3.5_large.safetensors"
    tiny_controlnet.write_base(base)
    html = tmp_path / "page.safetensors"
    html.write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    for path, words in ((sd15, "not an SD3 ControlNet"), (base, "not an SD3 ControlNet"),
                        (html, "not a safetensors file")):
        with pytest.raises(ControlNetError) as error:
            load_controlnet(path)
        assert words in one_line(error.value) and path.name in str(error.value)


def test_alimama_inpainting_layout_is_refused_in_one_line():
    shapes = {"pos_embed_input.proj.weight": (1536, 17, 2, 2), "controlnet_blocks.0.weight": (1536, 1536),
              "transformer_blocks.0.attn.to_q.weight": (1536, 1536), "context_embedder.weight": (1536, 4096),
              "pos_embed.proj.weight": (1536, 16, 2, 2), "pos_embed.pos_embed": (1, 192 * 192, 1536),
              "time_text_embed.text_embedder.linear_1.weight": (1536, 2048)}
    with pytest.raises(ControlNetError) as error:
        config_from_shapes(shapes, "sd3_inpainting.safetensors")
    assert "inpainting ControlNet" in one_line(error.value) and "mask" in str(error.value)


def test_truncated_file_is_refused_before_anything_is_read(tmp_path):
    path = tmp_path / "sd3.5_large_controlnet_depth.safetensors"
    tiny_controlnet.write_controlnet(path, control_type=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(ControlNetError) as error:
        load_controlnet(path)
    assert "truncated" in one_line(error.value) and "download it again" in str(error.value)


def test_missing_block_is_refused(tmp_path):
    path = tmp_path / "cn.safetensors"
    state = tiny_controlnet.released_state(tiny_controlnet.diffusers_controlnet(), 1)
    del state["transformer_blocks.1.mlp.fc2.weight"]
    save_file(state, str(path))
    with pytest.raises(ControlNetError, match="1 missing .*transformer_blocks.1.mlp.fc2.weight"):
        load_controlnet(path)


def test_unknown_control_type_is_refused(tmp_path):
    path = tmp_path / "cn.safetensors"
    state = tiny_controlnet.released_state(tiny_controlnet.diffusers_controlnet(), 7)
    save_file(state, str(path))
    with pytest.raises(ControlNetError, match="unknown control_type 7"):
        inspect(path)


def test_a_tensor_that_reads_wrong_fails_the_whole_load(tmp_path):
    """A header whose byte ranges do not fit a tensor (fails while reading, after the key check): one line,
    no model."""
    path = tmp_path / "cn.safetensors"
    tiny_controlnet.write_controlnet(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["controlnet_blocks.1.weight"]["dtype"] = "F16"  # same shape, twice the bytes it should have
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    path.write_bytes(raw[:8] + text + raw[8 + length:])
    with pytest.raises(ControlNetError) as error:
        load_controlnet(path)
    assert "controlnet_blocks.1.weight" in one_line(error.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fp32_file_is_streamed_to_the_model_dtype(tmp_path, dtype):
    path = tmp_path / "cn.safetensors"
    reference = tiny_controlnet.write_controlnet(path)
    file, model = load_controlnet(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.is_meta for p in model.parameters()) and not any(p.requires_grad for p in model.parameters())
    state = tiny_controlnet.released_state(reference, 1)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[key].to(dtype)), key
    assert "pos_embed.proj.weight" not in model.state_dict()  # the file's own patch embedding is never used
