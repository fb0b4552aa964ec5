"""The doctor names the SD3 family of each checkpoint from its header; broken SD3 files are warnings."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lib_sd3 import doctor
from tests import tiny_sd35


def test_families_of_checkpoints_from_headers(tmp_path):
    folder = tmp_path / "Stable-diffusion"
    (folder / "sub").mkdir(parents=True)
    tiny_sd35.write_checkpoint(folder / "sd35m.safetensors", "sd3.5-medium")
    tiny_sd35.write_checkpoint(folder / "sub" / "large.safetensors", "sd3.5-large",
                               metadata={"modelspec.title": "Stable Diffusion 3.5 Large Turbo"})
    tiny_sd35.write_checkpoint(folder / "sd3.safetensors", "sd3-medium")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(folder / "sd15.safetensors"))
    data = (folder / "sd3.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    rows = {c.item: c for c in doctor.check_checkpoints(folder)}
    assert set(rows) == {"sd35m.safetensors", "sub/large.safetensors", "sd3.safetensors", "cut.safetensors"}
    assert rows["sd35m.safetensors"].status == doctor.OK
    assert rows["sd35m.safetensors"].detail.startswith("SD3.5 Medium: depth 3, qk-norm rms, MMDiT-X layers [0, 1]")
    assert "A1111 alone cannot run it" in rows["sd35m.safetensors"].detail
    assert rows["sub/large.safetensors"].detail.startswith("SD3.5 Large Turbo")
    assert "(Turbo from its metadata)" in rows["sub/large.safetensors"].detail
    assert rows["sd3.safetensors"].detail.startswith("SD3 Medium") and "cannot" not in rows["sd3.safetensors"].detail
    assert rows["cut.safetensors"].status == doctor.WARN and "truncated" in rows["cut.safetensors"].detail
    assert doctor.check_checkpoints(tmp_path / "absent") == []
