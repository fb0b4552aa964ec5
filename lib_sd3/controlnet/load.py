"""Load a ControlNet file into a :class:`~lib_sd3.controlnet.model.ControlNet` -- whole or not at all.

The released files are fp32 (8.65 GB for SD3.5 Large); the model runs in the base's dtype (fp16: 4.3 GB).
Converting the whole file first would hold both. Instead the model is built on the meta device (no memory,
no random init), every key is checked against the file's header before a byte of tensor data is read, and
the tensors are then read one at a time (:class:`~lib_sd3.safetensors_file.SafetensorsReader`) into one
scratch buffer, each copied out converted to the target dtype and device: the peak is the converted model
plus the largest fp32 tensor (94 MB of 4.3 GB for SD3.5 Large). Reading each into memory of its own and
freeing it after the conversion left the freed buffers with the allocator: up to +50 % measured. A file that turns out short while reading raises :class:`ControlNetError` and the partly filled
model is dropped: a caller keeps what it had.

A diffusers-layout SD3 Medium ControlNet (:mod:`.joint`) is read the same way; where diffusers splits a fused
projection (``attn.to_q`` / ``to_k`` / ``to_v``), each part is read into the scratch buffer and copied into its
rows of the converted tensor, so the peak rule holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lib_sd3 import get_logger
from lib_sd3.controlnet.detect import ControlNetConfig, ControlNetError, ControlNetFile, inspect
from lib_sd3.controlnet.joint import JointControlNet
from lib_sd3.controlnet.model import ControlNet
from lib_sd3.models.families import FIRST_ERRORS
from lib_sd3.models.mmdit import QkvLinear
from lib_sd3.safetensors_file import SafetensorsReader

log = get_logger("controlnet")


AnyControlNet = ControlNet | JointControlNet


def model_class(config: ControlNetConfig) -> type[AnyControlNet]:
    return JointControlNet if config.joint else ControlNet


def file_shapes(model: AnyControlNet) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Each parameter of ``model`` -> the file's tensors that fill it, with the shape each must have (the
    parameter's rows split evenly where several are concatenated)."""
    plan = {}
    for key, tensor in model.state_dict().items():
        names = model.file_names(key)
        shape = (tensor.shape[0] // len(names), *tensor.shape[1:])
        plan[key] = [(name, shape) for name in names]
    return plan


def check_keys(file: ControlNetFile, expected: dict[str, tuple[int, ...]], ignored: tuple[str, ...] = ()) -> None:
    """:class:`ControlNetError` unless the file's tensors fill ``expected`` exactly (bar ``ignored``: Stability's
    ``control_type`` and unused ``pos_embed.proj``)."""
    found = {k: v for k, v in file.header.shapes.items() if k not in ignored}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    parts = [f"{len(keys)} {what} (first: {', '.join(keys[:FIRST_ERRORS])})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
             if keys]
    if parts:
        kind = "an SD3 ControlNet in diffusers' layout" if file.config.joint else "an SD3.5 ControlNet"
        raise ControlNetError(f"{file.path.name}: does not fit {kind}: {'; '.join(parts)}")


def load_controlnet(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    qkv_linear: type[nn.Linear] = QkvLinear) -> tuple[ControlNetFile, AnyControlNet]:
    """The file's description and its filled, eval-mode ControlNet in ``dtype`` on ``device``."""
    file = inspect(path)
    model = model_class(file.config)(file.config, qkv_linear=qkv_linear, dtype=dtype, device="meta")
    plan = file_shapes(model)
    check_keys(file, {name: shape for parts in plan.values() for name, shape in parts}, model.IGNORED_FILE_KEYS)
    targets = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    tensors = file.header.tensors
    order = sorted(plan, key=lambda k: tensors[plan[k][0][0]].start)  # sequential reads
    scratch = torch.empty(max(tensors[name].end - tensors[name].start for parts in plan.values() for name, _ in parts),
                          dtype=torch.uint8)  # every tensor is read here, then copied out converted
    try:
        with SafetensorsReader(file.path) as reader:
            for key in order:
                if len(plan[key]) == 1:
                    state[key] = reader.get_tensor(plan[key][0][0], scratch).to(device=device, dtype=dtype, copy=True)
                    continue
                state[key] = torch.empty(targets[key], dtype=dtype, device=device)
                for rows, (name, _) in zip(state[key].chunk(len(plan[key])), plan[key], strict=True):
                    rows.copy_(reader.get_tensor(name, scratch))
    except ValueError as error:
        raise ControlNetError(str(error)) from None
    except OSError as error:
        raise ControlNetError(f"{file.path.name}: read failed ({error.strerror or error})") from None
    model.load_state_dict(state, strict=True, assign=True)
    log.info("ControlNet %s: %s, %d blocks, for %s, %s", file.path.name, file.control_type.label,
             file.config.depth, file.config.base_name, str(dtype).removeprefix("torch."))
    return file, model.eval().requires_grad_(False)
