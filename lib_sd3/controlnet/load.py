"""Load a ControlNet file into a :class:`~lib_sd3.controlnet.model.ControlNet` -- whole or not at all.

The released files are fp32 (8.65 GB for SD3.5 Large); the model runs in the base's dtype (fp16: 4.3 GB).
Converting the whole file first would hold both. Instead the model is built on the meta device (no memory,
no random init), every key is checked against the file's header before a byte of tensor data is read, and
the tensors are then read one at a time (:class:`~lib_sd3.safetensors_file.SafetensorsReader`) into one
scratch buffer, each copied out converted to the target dtype and device: the peak is the converted model
plus the largest fp32 tensor (94 MB of 4.3 GB for SD3.5 Large). Reading each into memory of its own and
freeing it after the conversion left the freed buffers with the allocator: up to +50 % measured. A file that turns out short while reading raises :class:`ControlNetError` and the partly filled
model is dropped: a caller keeps what it had.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib_sd3 import get_logger
from lib_sd3.controlnet.detect import CONTROL_TYPE_KEY, UNUSED_KEYS, ControlNetError, ControlNetFile, inspect
from lib_sd3.controlnet.model import ControlNet
from lib_sd3.models.families import FIRST_ERRORS
from lib_sd3.models.mmdit import QkvLinear
from lib_sd3.safetensors_file import SafetensorsReader

log = get_logger("controlnet")


def check_keys(file: ControlNetFile, expected: dict[str, tuple[int, ...]]) -> None:
    """:class:`ControlNetError` unless the file's tensors fill ``expected`` exactly (bar ``control_type`` and
    the unused ``pos_embed.proj``)."""
    found = {k: v for k, v in file.header.shapes.items() if k != CONTROL_TYPE_KEY and k not in UNUSED_KEYS}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    parts = [f"{len(keys)} {what} (first: {', '.join(keys[:FIRST_ERRORS])})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
             if keys]
    if parts:
        raise ControlNetError(f"{file.path.name}: does not fit an SD3.5 ControlNet: {'; '.join(parts)}")


def load_controlnet(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    qkv_linear: type[nn.Linear] = QkvLinear) -> tuple[ControlNetFile, ControlNet]:
    """The file's description and its filled, eval-mode ControlNet in ``dtype`` on ``device``."""
    file = inspect(path)
    model = ControlNet(file.config, qkv_linear=qkv_linear, dtype=dtype, device="meta")
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    check_keys(file, expected)
    state: dict[str, torch.Tensor] = {}
    order = sorted(expected, key=lambda k: file.header.tensors[k].start)  # sequential reads
    scratch = torch.empty(max(file.header.tensors[k].end - file.header.tensors[k].start for k in order),
                          dtype=torch.uint8)  # every tensor is read here, then copied out converted
    try:
        with SafetensorsReader(file.path) as reader:
            for key in order:
                state[key] = reader.get_tensor(key, scratch).to(device=device, dtype=dtype, copy=True)
    except ValueError as error:
        raise ControlNetError(str(error)) from None
    except OSError as error:
        raise ControlNetError(f"{file.path.name}: read failed ({error.strerror or error})") from None
    model.load_state_dict(state, strict=True, assign=True)
    log.info("ControlNet %s: %s, %d blocks, for %s, %s", file.path.name, file.control_type.label,
             file.config.depth, file.config.base_name, str(dtype).removeprefix("torch."))
    return file, model.eval().requires_grad_(False)
