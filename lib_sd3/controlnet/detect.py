"""What a ControlNet file is, from its safetensors header: an SD3.5 ControlNet in Stability's released layout,
an SD3 ControlNet in another layout, or no SD3 ControlNet at all -- and whether it fits the loaded base.

Stability's ``sd3.5_large_controlnet_{blur,canny,depth}.safetensors`` hold ``control_type`` (int32: 0 blur,
1 canny, 2 depth), ``pos_embed.proj.*`` (never used: the base's patch embedding feeds the ControlNet),
``pos_embed_input.proj.*`` (the control latent's patch embedding), ``time_text_embed.{timestep,text}_embedder.
linear_{1,2}.*``, ``transformer_blocks.N.{adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}.*`` and
``controlnet_blocks.N.*``. Everything here reads shapes only, except the 4 bytes of ``control_type``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from pathlib import Path

from lib_sd3.models.families import FIRST_ERRORS, HEAD_DIM, MMDiTConfig
from lib_sd3.safetensors_file import Header, SafetensorsReader, read_header

CONTROL_TYPE_KEY = "control_type"
UNUSED_KEYS = ("pos_embed.proj.weight", "pos_embed.proj.bias")  # the base's patch embedding is used instead
PROBE_KEYS = ("pos_embed_input.proj.weight", "controlnet_blocks.0.weight")  # every SD3 ControlNet has both
STABILITY_PROBE = "transformer_blocks.0.attn.qkv.weight"
DIFFUSERS_PROBE = "transformer_blocks.0.attn.to_q.weight"
BASE_NAMES = {HEAD_DIM * 38: "SD3.5 Large / Large Turbo", HEAD_DIM * 24: "SD3 Medium / SD3.5 Medium"}

_BLOCK_KEY = re.compile(r"^(transformer_blocks|controlnet_blocks)\.(\d+)\.")


class ControlNetError(ValueError):
    """A ControlNet file that cannot be used: one line saying why."""


class ControlType(enum.IntEnum):
    """The file's ``control_type``: what its control image is (Stability's numbering)."""

    BLUR = 0
    CANNY = 1
    DEPTH = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Everything needed to build a ControlNet for a file, read from its shapes."""

    depth: int  # ControlNet blocks (19 for SD3.5 Large)
    hidden_size: int  # = the base's (2432 for SD3.5 Large)
    patch_size: int
    in_channels: int  # latent channels of the control image (16)
    pooled_dim: int  # the text embedder's input: the raw pooled CLIP-L+G vector (2048)

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM

    @property
    def base_name(self) -> str:
        return BASE_NAMES.get(self.hidden_size, f"an SD3 model of width {self.hidden_size}")


@dataclasses.dataclass(frozen=True)
class ControlNetFile:
    path: Path
    header: Header
    config: ControlNetConfig
    control_type: ControlType


def _error(where: str, text: str) -> ControlNetError:
    return ControlNetError(f"{where}: {text}")


def is_sd3_controlnet(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    return all(key in shapes for key in PROBE_KEYS)


def _indices(shapes: Mapping[str, tuple[int, ...]], group: str) -> set[int]:
    return {int(m.group(2)) for key in shapes if (m := _BLOCK_KEY.match(key)) and m.group(1) == group}


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], where: str = "ControlNet") -> ControlNetConfig:
    """The :class:`ControlNetConfig` of a released-layout SD3.5 ControlNet; :class:`ControlNetError` otherwise."""
    if not is_sd3_controlnet(shapes):
        raise _error(where, "not an SD3 ControlNet (no pos_embed_input / controlnet_blocks)")
    if DIFFUSERS_PROBE in shapes or "context_embedder.weight" in shapes:
        raise _error(where, "an SD3 ControlNet in diffusers' layout (InstantX / Alimama, for SD3 Medium): "
                            "not supported yet, only Stability's SD3.5 Large ControlNets")
    if STABILITY_PROBE not in shapes:
        raise _error(where, f"SD3 ControlNet of an unknown layout (no {STABILITY_PROBE})")
    blocks, outputs = _indices(shapes, "transformer_blocks"), _indices(shapes, "controlnet_blocks")
    depth = len(blocks)
    if blocks != set(range(depth)) or outputs != blocks:
        raise _error(where, f"transformer blocks {sorted(blocks)[:FIRST_ERRORS]}... and controlnet blocks do not "
                            f"match 0..{depth - 1}: truncated or merged wrongly")
    hidden, in_channels, patch = shapes["pos_embed_input.proj.weight"][:3]
    text_key = "time_text_embed.text_embedder.linear_1.weight"
    if text_key not in shapes:
        raise _error(where, f"SD3 ControlNet without {text_key}")
    pooled_dim = shapes[text_key][1]
    if hidden % HEAD_DIM:
        raise _error(where, f"width {hidden} is not a multiple of {HEAD_DIM}: not an SD3 ControlNet")
    return ControlNetConfig(depth=depth, hidden_size=hidden, patch_size=patch, in_channels=in_channels,
                            pooled_dim=pooled_dim)


def inspect(path: str | Path) -> ControlNetFile:
    """Header, config and control type of a ControlNet file; :class:`ControlNetError` for anything unusable
    (not safetensors, truncated, not an SD3 ControlNet, a layout we do not build)."""
    path = Path(path)
    try:
        header = read_header(path)
    except OSError as error:
        raise _error(path.name, f"cannot read it ({error.strerror or error})") from None
    except ValueError as error:
        raise _error(path.name, str(error)) from None
    if header.size < header.extent:
        raise _error(path.name, f"truncated: {header.size} bytes, its header promises {header.extent} "
                                f"({100 * header.size / header.extent:.1f} %); download it again")
    config = config_from_shapes(header.shapes, path.name)
    return ControlNetFile(path, header, config, read_control_type(path, header))


def read_control_type(path: Path, header: Header) -> ControlType:
    if CONTROL_TYPE_KEY not in header.tensors:
        raise _error(path.name, f"SD3.5 ControlNet without {CONTROL_TYPE_KEY!r}")
    info = header.tensors[CONTROL_TYPE_KEY]
    if info.dtype not in ("I32", "I64") or len(info.shape) > 1 or (info.shape and info.shape[0] != 1):
        raise _error(path.name, f"{CONTROL_TYPE_KEY} is {info.dtype} {list(info.shape)}, not one integer")
    try:
        with SafetensorsReader(path) as reader:
            value = int(reader.get_tensor(CONTROL_TYPE_KEY).reshape(-1)[0])
    except ValueError as error:
        raise _error(path.name, str(error).removeprefix(f"{path.name}: ")) from None
    try:
        return ControlType(value)
    except ValueError:
        raise _error(path.name, f"unknown control_type {value} (known: 0 blur, 1 canny, 2 depth)") from None


def check_base(config: ControlNetConfig, base: MMDiTConfig, base_label: str, where: str = "ControlNet") -> None:
    """:class:`ControlNetError` unless the ControlNet can steer this base: same width, patch and latent channels,
    the raw pooled vector as its text input (Stability's "8B" path), and a whole number of joint blocks per
    ControlNet block (the base adds hidden state ``i // (joint blocks // ControlNet blocks)`` after block i)."""
    problems = []
    if config.hidden_size != base.hidden_size:
        problems.append(f"width {config.hidden_size} vs {base.hidden_size}")
    if config.patch_size != base.patch_size or config.in_channels != base.in_channels:
        problems.append(f"patch {config.patch_size} / {config.in_channels} channels vs "
                        f"{base.patch_size} / {base.in_channels}")
    if config.pooled_dim != base.adm_dim:
        problems.append(f"pooled input {config.pooled_dim} vs {base.adm_dim}")
    if config.depth > base.depth or base.depth % config.depth:
        problems.append(f"{config.depth} ControlNet blocks do not divide {base.depth} joint blocks")
    if problems:
        shape = f"{config.depth} block{'s' if config.depth != 1 else ''}"
        if config.hidden_size in BASE_NAMES:
            shape += f", width {config.hidden_size}"
        raise _error(where, f"a ControlNet for {config.base_name} ({shape}) does not fit the loaded {base_label}: "
                            f"{'; '.join(problems)}")
