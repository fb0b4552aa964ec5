"""Loaded ControlNets are kept per file and dtype, checked against the base every time, released on purpose."""

from __future__ import annotations

import os

import pytest
import torch

from lib_sd3.controlnet.cache import ControlNetCache, key_of
from lib_sd3.controlnet.detect import ControlNetError
from lib_sd3.models.families import MMDiTConfig
from tests import tiny_controlnet

BASE = MMDiTConfig(depth=4, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=12, context_dim=48,
                   adm_dim=40, qk_norm="rms")
OTHER_BASE = MMDiTConfig(depth=3, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=12,
                         context_dim=48, adm_dim=40, qk_norm="rms")


@pytest.fixture
def files(tmp_path):
    canny, depth = tmp_path / "canny.safetensors", tmp_path / "depth.safetensors"
    tiny_controlnet.write_controlnet(canny, control_type=1)
    tiny_controlnet.write_controlnet(depth, control_type=2, seed=3)
    return canny, depth


def test_loaded_once_per_file_and_dtype(files):
    canny, _ = files
    cache = ControlNetCache()
    first = cache.get(canny, BASE, "tiny")
    assert cache.get(canny, BASE, "tiny")[1] is first[1]
    assert cache.get(canny, BASE, "tiny", dtype=torch.float32)[1] is not first[1]
    assert len(cache) == 2 and first[0].control_type.label == "canny"


def test_a_file_replaced_on_disk_loads_anew(files):
    canny, _ = files
    cache = ControlNetCache()
    before = cache.get(canny, BASE, "tiny")[1]
    tiny_controlnet.write_controlnet(canny, control_type=1, seed=30)
    os.utime(canny, ns=(1, 1))
    assert cache.get(canny, BASE, "tiny")[1] is not before


def test_wrong_base_is_refused_before_and_after_loading(files):
    canny, _ = files
    cache = ControlNetCache()
    with pytest.raises(ControlNetError, match="does not fit the loaded other"):
        cache.get(canny, OTHER_BASE, "other")
    assert len(cache) == 0  # nothing was loaded for it
    cache.get(canny, BASE, "tiny")
    with pytest.raises(ControlNetError, match="does not fit the loaded other"):
        cache.get(canny, OTHER_BASE, "other")


def test_keep_only_and_clear_release(files):
    canny, depth = files
    cache = ControlNetCache()
    cache.get(canny, BASE, "tiny")
    cache.get(depth, BASE, "tiny")
    kept = key_of(depth, torch.float16, "cpu")
    assert cache.keep_only({kept}) == ["canny.safetensors"]
    assert kept in cache and [m["name"] for m in cache.loaded()] == ["depth.safetensors"]
    assert cache.loaded()[0]["bytes"] > 0 and cache.loaded()[0]["type"] == "depth"
    assert cache.clear() == ["depth.safetensors"] and len(cache) == 0


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ControlNetError, match="gone.safetensors: cannot read it"):
        ControlNetCache().get(tmp_path / "gone.safetensors", BASE, "tiny")
