"""What a ControlNet file is, from its safetensors header: an SD3.5 ControlNet in Stability's released layout,
an SD3 Medium ControlNet in diffusers' layout, or no SD3 ControlNet we build -- and whether it fits the loaded base.

Stability's ``sd3.5_large_controlnet_{blur,canny,depth}.safetensors`` hold ``control_type`` (int32: 0 blur,
1 canny, 2 depth), ``pos_embed.proj.*`` (never used: the base's patch embedding feeds the ControlNet),
``pos_embed_input.proj.*`` (the control latent's patch embedding), ``time_text_embed.{timestep,text}_embedder.
linear_{1,2}.*``, ``transformer_blocks.N.{adaLN_modulation.1, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}.*`` and
``controlnet_blocks.N.*``. Everything here reads shapes only, except the 4 bytes of ``control_type``.

InstantX's SD3 Medium ControlNets (canny / pose / tile: diffusers' ``SD3ControlNetModel`` with joint blocks) hold
diffusers' names: ``pos_embed.{proj.*, pos_embed}`` (their own patch and position embedding),
``pos_embed_input.proj.*``, ``context_embedder.*``, ``time_text_embed.*``, ``transformer_blocks.N.{attn.to_q,
attn.add_q_proj, norm1.linear, norm1_context.linear, ff.net.0.proj, ff_context.net.2, ...}.*`` and
``controlnet_blocks.N.*``; no ``control_type``: the type is read from the file's name.
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
DIFFUSERS_POS_EMBED = "pos_embed.pos_embed"  # (1, max * max, width): the joint ControlNet's own position grid

_BLOCK_KEY = re.compile(r"^(transformer_blocks|controlnet_blocks)\.(\d+)\.")


class ControlNetError(ValueError):
    """A ControlNet file that cannot be used: one line saying why."""


class ControlType(enum.IntEnum):
    """What a ControlNet's control image is, which decides its pixel scaling (:mod:`.preprocess`).

    0..2 are Stability's ``control_type`` numbering for the SD3.5 files. The ``SD3M_*`` types are for the SD3
    Medium ControlNets in diffusers' layout, whose files carry no type (it comes from the file's name,
    :func:`type_from_name`): they are separate from ``CANNY`` because Stability's canny ControlNet was trained on
    a differently scaled image than InstantX's.
    """

    BLUR = 0
    CANNY = 1
    DEPTH = 2
    SD3M = 10  # an SD3 Medium ControlNet whose name says no type: the image as it is
    SD3M_CANNY = 11
    SD3M_POSE = 12
    SD3M_TILE = 13

    @property
    def label(self) -> str:
        return self.name.lower()


STABILITY_TYPES = (ControlType.BLUR, ControlType.CANNY, ControlType.DEPTH)  # the values a released file holds
SD3M_NAME_WORDS = {"canny": ControlType.SD3M_CANNY, "pose": ControlType.SD3M_POSE, "tile": ControlType.SD3M_TILE}


def type_from_name(name: str) -> ControlType:
    """The type of a diffusers-layout SD3 Medium ControlNet from its file name (``SD3M`` when none is named)."""
    lower = name.lower()
    found = [kind for word, kind in SD3M_NAME_WORDS.items() if word in lower]
    return found[0] if len(found) == 1 else ControlType.SD3M


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Everything needed to build a ControlNet for a file, read from its shapes."""

    depth: int  # ControlNet blocks (19 for SD3.5 Large, 6 for InstantX's SD3 Medium ones)
    hidden_size: int  # = the base's (2432 for SD3.5 Large, 1536 for SD3 Medium)
    patch_size: int
    in_channels: int  # latent channels of the control image (16)
    pooled_dim: int  # the text embedder's input: the pooled CLIP-L+G vector's width (2048)
    # diffusers' joint form (SD3 Medium): the raw context's width (4096) and its own position grid; None for
    # Stability's single-stream form
    context_dim: int | None = None
    pos_embed_max_size: int | None = None

    @property
    def joint(self) -> bool:
        """Joint blocks with a text stream (diffusers' layout) rather than Stability's single-stream blocks."""
        return self.context_dim is not None

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
    """The :class:`ControlNetConfig` of a released-layout SD3.5 ControlNet or a diffusers-layout SD3 Medium
    ControlNet; :class:`ControlNetError` otherwise."""
    if not is_sd3_controlnet(shapes):
        raise _error(where, "not an SD3 ControlNet (no pos_embed_input / controlnet_blocks)")
    diffusers = DIFFUSERS_PROBE in shapes or "context_embedder.weight" in shapes
    if not diffusers and STABILITY_PROBE not in shapes:
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
    config = ControlNetConfig(depth=depth, hidden_size=hidden, patch_size=patch, in_channels=in_channels,
                              pooled_dim=pooled_dim)
    return _joint_config(shapes, config, where) if diffusers else config


def _joint_config(shapes: Mapping[str, tuple[int, ...]], config: ControlNetConfig, where: str) -> ControlNetConfig:
    """The diffusers (InstantX) form: its own context embedder and position grid; refused where it needs an input
    a ControlNet unit does not give (Alimama's inpainting ControlNet: the control latent plus the mask)."""
    proj = shapes.get("pos_embed.proj.weight")
    if proj is not None and config.in_channels > proj[1]:
        raise _error(where, f"an SD3 inpainting ControlNet (Alimama: control input {config.in_channels} channels = "
                            f"the masked image's latent + the mask): not supported, a ControlNet unit carries "
                            f"no mask")
    missing = [key for key in ("context_embedder.weight", "pos_embed.proj.weight", DIFFUSERS_POS_EMBED)
               if key not in shapes]
    if missing:
        raise _error(where, f"SD3 ControlNet in diffusers' layout without {', '.join(missing)}")
    if tuple(proj[:3]) != (config.hidden_size, config.in_channels, config.patch_size):
        raise _error(where, f"pos_embed.proj {list(proj)} does not match pos_embed_input {config.hidden_size} / "
                            f"{config.in_channels} / {config.patch_size}")
    grid = shapes[DIFFUSERS_POS_EMBED][1]
    size = round(grid ** 0.5)
    if size * size != grid:
        raise _error(where, f"{DIFFUSERS_POS_EMBED} has {grid} positions, not a square grid")
    return dataclasses.replace(config, context_dim=shapes["context_embedder.weight"][1], pos_embed_max_size=size)


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
    control_type = type_from_name(path.name) if config.joint else read_control_type(path, header)
    return ControlNetFile(path, header, config, control_type)


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
    if value not in STABILITY_TYPES:
        raise _error(path.name, f"unknown control_type {value} (known: 0 blur, 1 canny, 2 depth)")
    return ControlType(value)


def check_base(config: ControlNetConfig, base: MMDiTConfig, base_label: str, where: str = "ControlNet") -> None:
    """:class:`ControlNetError` unless the ControlNet can steer this base: same width, patch and latent channels,
    the raw pooled vector as its text input (Stability's "8B" path), and a whole number of joint blocks per
    ControlNet block (the base adds hidden state ``i // (joint blocks // ControlNet blocks)`` after block i).
    A joint (diffusers-layout) ControlNet takes the raw context instead of the base's, so its width must match,
    and it has at most as many blocks as the base (diffusers spreads them, :mod:`.control`)."""
    problems = []
    if config.hidden_size != base.hidden_size:
        problems.append(f"width {config.hidden_size} vs {base.hidden_size}")
    if config.patch_size != base.patch_size or config.in_channels != base.in_channels:
        problems.append(f"patch {config.patch_size} / {config.in_channels} channels vs "
                        f"{base.patch_size} / {base.in_channels}")
    if config.pooled_dim != base.adm_dim:
        problems.append(f"pooled input {config.pooled_dim} vs {base.adm_dim}")
    if config.joint:
        if config.context_dim != base.context_dim:
            problems.append(f"context {config.context_dim} vs {base.context_dim}")
        if config.depth > base.depth:
            problems.append(f"{config.depth} ControlNet blocks for {base.depth} joint blocks")
    elif config.depth > base.depth or base.depth % config.depth:
        problems.append(f"{config.depth} ControlNet blocks do not divide {base.depth} joint blocks")
    if problems:
        shape = f"{config.depth} block{'s' if config.depth != 1 else ''}"
        if config.hidden_size in BASE_NAMES:
            shape += f", width {config.hidden_size}"
        raise _error(where, f"a ControlNet for {config.base_name} ({shape}) does not fit the loaded {base_label}: "
                            f"{'; '.join(problems)}")
