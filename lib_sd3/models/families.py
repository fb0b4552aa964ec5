"""Which SD3 family a checkpoint is, from its tensor names and shapes (a safetensors header is enough).

A1111 builds every SD3 checkpoint as SD3 Medium: depth, patch, pos-embed size and context width
come from shapes, but qk-norm and MMDiT-X never do, so SD3.5 Large loads with its ``ln_q``/``ln_k``
weights silently dropped and SD3.5 Medium fails on a shape error. The family decides which MMDiT
to build; everything here is read from the keys and shapes, never from the file name -- except
the Turbo flag, which changes settings and not weights, so it can only come from the safetensors
metadata (``modelspec.*``) or the file name.

Detection never loads a tensor: :func:`read_checkpoint_header` reads the 8-byte length and the JSON header,
and checks the file is as long as the header promises (a truncated download is named as such).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path

from lib_sd3 import safetensors_file
from lib_sd3.safetensors_file import Header

HEAD_DIM = 64  # sd3-ref's "magic": hidden size = 64 * depth, heads = depth
PREFIXES = ("model.diffusion_model.", "")  # A1111 / Stability full checkpoints, then a bare MMDiT file
PROBE = "joint_blocks.0.x_block.attn.qkv.weight"
FIRST_ERRORS = 3  # how many offending keys an error names

_BLOCK_KEY = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")

Shapes = Mapping[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as SD3: truncated, not safetensors, or an unknown SD3 layout."""


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Everything needed to build an MMDiT for a checkpoint, as read from its shapes."""

    depth: int
    patch_size: int
    in_channels: int
    out_channels: int
    pos_embed_max_size: int
    context_dim: int
    adm_dim: int
    qk_norm: str | None = None  # "rms" (SD3.5) or None (SD3 Medium)
    x_block_self_attn_layers: tuple[int, ...] = ()  # MMDiT-X: blocks with a second image self-attention

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth


@dataclasses.dataclass(frozen=True)
class Family:
    """One SD3 family as detected: ``name`` is the stable id, ``label`` what people call it."""

    name: str  # "sd3-medium" | "sd3.5-large" | "sd3.5-large-turbo" | "sd3.5-medium"
    label: str
    config: MMDiTConfig
    prefix: str = "model.diffusion_model."  # where the MMDiT's keys live in the checkpoint
    turbo_from: str = ""  # "metadata" / "file name" when Turbo was recognised, else ""

    @property
    def needs_our_mmdit(self) -> bool:
        """A1111's own construction is right for SD3 Medium only (no qk-norm, no MMDiT-X)."""
        return self.config.qk_norm is not None or bool(self.config.x_block_self_attn_layers)

    def __str__(self) -> str:
        return self.label


SD3_MEDIUM, SD35_LARGE, SD35_LARGE_TURBO, SD35_MEDIUM = "sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"
LABELS = {SD3_MEDIUM: "SD3 Medium", SD35_LARGE: "SD3.5 Large", SD35_LARGE_TURBO: "SD3.5 Large Turbo",
          SD35_MEDIUM: "SD3.5 Medium"}


# --- the safetensors header ---------------------------------------------------------------------

def read_checkpoint_header(path: str | Path) -> Header:
    """Tensor shapes and metadata of a safetensors file, read without touching tensor data
    (:func:`lib_sd3.safetensors_file.read_header`).

    Raises :class:`CheckpointError` for a file that is not safetensors or is shorter than its
    header says (an interrupted download).
    """
    path = Path(path)
    try:
        header = safetensors_file.read_header(path)
    except ValueError as error:
        raise CheckpointError(f"{path.name}: {error}") from None
    if header.size < header.extent:
        raise CheckpointError(f"{path.name}: truncated: {header.size} bytes, its header promises {header.extent} "
                              f"({100 * header.size / header.extent:.1f} %); download it again")
    return header


# --- detection ----------------------------------------------------------------------------------

def mmdit_prefix(keys: Mapping[str, object] | set[str]) -> str | None:
    """Where the MMDiT keys start (``model.diffusion_model.`` or bare), or None: not SD3-shaped."""
    for prefix in PREFIXES:
        if prefix + PROBE in keys and prefix + "x_embedder.proj.weight" in keys:
            return prefix
    return None


def _contiguous(indices: set[int]) -> bool:
    return indices == set(range(len(indices)))


def _turbo_source(metadata: Mapping[str, str], filename: str | None) -> str:
    if any("turbo" in value.lower() for key, value in metadata.items() if key.startswith("modelspec.")):
        return "metadata"
    if filename and "turbo" in Path(filename).name.lower():
        return "file name"
    return ""


def _shape(shapes: Shapes, key: str, where: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise CheckpointError(f"{where}: SD3-shaped but {key} is missing") from None


def detect(shapes: Shapes, metadata: Mapping[str, str] | None = None, filename: str | None = None) -> Family | None:
    """The :class:`Family` of a checkpoint from ``{key: shape}``; None if it is not SD3-shaped at all.

    Raises :class:`CheckpointError` for an SD3-shaped checkpoint that fits no known family
    (blocks missing, MMDiT-X layers with holes, MMDiT-X without qk-norm, widths that break the
    64-per-head rule) -- building anything from it would only fail later, or silently.
    """
    where = Path(filename).name if filename else "checkpoint"
    prefix = mmdit_prefix(shapes)
    if prefix is None:
        return None
    blocks: dict[int, set[str]] = {}
    for key in shapes:
        if key.startswith(prefix):
            match = _BLOCK_KEY.match(key[len(prefix):])
            if match:
                blocks.setdefault(int(match.group(1)), set()).add(match.group(2))
    depth = len(blocks)
    if not _contiguous(set(blocks)):
        missing = sorted(set(range(max(blocks) + 1)) - set(blocks))[:FIRST_ERRORS]
        raise CheckpointError(f"{where}: SD3-shaped but joint blocks {missing} are missing "
                              f"(found {depth} of 0..{max(blocks)}): truncated or merged wrongly")

    x_proj = _shape(shapes, prefix + "x_embedder.proj.weight", where)
    hidden, in_channels, patch = x_proj[0], x_proj[1], x_proj[2]
    if hidden != HEAD_DIM * depth:
        raise CheckpointError(f"{where}: unknown SD3 layout: width {hidden} with {depth} joint blocks "
                              f"(every SD3/SD3.5 model has width 64 x depth)")
    num_patches = _shape(shapes, prefix + "pos_embed", where)[1]
    pos_embed_max_size = math.isqrt(num_patches)
    if pos_embed_max_size ** 2 != num_patches:
        raise CheckpointError(f"{where}: unknown SD3 layout: pos_embed has {num_patches} positions, not a square")
    context_dim = _shape(shapes, prefix + "context_embedder.weight", where)[1]
    adm_dim = _shape(shapes, prefix + "y_embedder.mlp.0.weight", where)[1]
    out_features = _shape(shapes, prefix + "final_layer.linear.weight", where)[0]
    out_channels = out_features // (patch * patch)

    with_qk_norm = {i for i, names in blocks.items() if "x_block.attn.ln_q.weight" in names
                    or "context_block.attn.ln_q.weight" in names}
    if with_qk_norm and with_qk_norm != set(blocks):
        raise CheckpointError(f"{where}: unknown SD3 layout: qk-norm weights in joint blocks "
                              f"{sorted(with_qk_norm)[:FIRST_ERRORS]}... but not in all {depth}")
    dual = {i for i, names in blocks.items() if any(n.startswith("x_block.attn2.") for n in names)}
    if dual and not _contiguous(dual):
        holes = sorted(set(range(max(dual) + 1)) - dual)[:FIRST_ERRORS]
        raise CheckpointError(f"{where}: MMDiT-X layers {sorted(dual)} have holes (no x_block.attn2 in blocks "
                              f"{holes}); SD3.5 Medium has them on the first blocks without a gap")
    if dual and not with_qk_norm:
        raise CheckpointError(f"{where}: unknown SD3 layout: MMDiT-X blocks without qk-norm")
    for i in sorted(dual):
        mods = _shape(shapes, f"{prefix}joint_blocks.{i}.x_block.adaLN_modulation.1.weight", where)[0]
        if mods != 9 * hidden:
            raise CheckpointError(f"{where}: unknown SD3 layout: MMDiT-X block {i} has a {mods // hidden}-way "
                                  f"modulation, not 9-way")

    config = MMDiTConfig(depth=depth, patch_size=patch, in_channels=in_channels, out_channels=out_channels,
                         pos_embed_max_size=pos_embed_max_size, context_dim=context_dim, adm_dim=adm_dim,
                         qk_norm="rms" if with_qk_norm else None, x_block_self_attn_layers=tuple(sorted(dual)))
    turbo_from = ""
    if dual:
        name = SD35_MEDIUM
    elif with_qk_norm:
        turbo_from = _turbo_source(metadata or {}, filename)
        name = SD35_LARGE_TURBO if turbo_from else SD35_LARGE
    else:
        name = SD3_MEDIUM
    return Family(name=name, label=LABELS[name], config=config, prefix=prefix, turbo_from=turbo_from)


def detect_file(path: str | Path) -> Family | None:
    """:func:`detect` on a safetensors file's header alone (no tensor is read)."""
    header = read_checkpoint_header(path)
    return detect(header.shapes, header.metadata, str(path))


def shapes_of(state_dict: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of an in-memory state dict (tensors or anything with ``.shape``)."""
    return {key: tuple(getattr(value, "shape", ())) for key, value in state_dict.items()}
