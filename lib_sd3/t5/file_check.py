"""Is this file a T5-XXL encoder we can load? Judged by its safetensors header (keys and shapes),
never by its name or byte length: conversions from other repos (bf16, fp32, fp8, "scaled fp8") differ in
length from the published file and are as good, and users keep them under the names ComfyUI or Stability
gave them (``t5xxl_fp8_e4m3fn_scaled.safetensors``, ``google_t5-v1_1-xxl_encoderonly-fp16.safetensors``,
``t5xxl.safetensors``) in ``models/CLIP`` or ``models/text_encoder``. One rule for the doctor, ``GET /sd3/t5``
and the WebUI, so they agree on every file. Only headers are read, never tensor data. Standard library only
(the doctor runs without torch).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from lib_sd3.fetch.known_files import KnownFile
from lib_sd3.safetensors_file import Header, read_header

XXL_CONFIG = {"d_ff": 10240, "d_model": 4096, "num_heads": 64, "num_layers": 24, "vocab_size": 32128}
"""A1111's ``T5_CONFIG`` (both SD3 states): google/t5-v1_1-xxl's encoder."""
EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "shared.weight")
"""The token embedding under both names files use: A1111's T5 reads the first; ComfyUI-made files
(the fp8 one is 4.89 GB: the embedding is stored once) may hold only the second."""
RELATIVE_BUCKETS = 32
SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # ComfyUI "scaled fp8"; llm-compressor / vLLM style
IGNORED_SUFFIXES = ("scale_input", "input_scale")  # activation scales: our layers upcast weights instead
SCALED_MARKER = "scaled_fp8"  # ComfyUI's marker tensor in scaled-fp8 files
PRECISIONS = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F8_E4M3": "fp8", "F8_E5M2": "fp8 (e5m2)"}
FOLDERS = ("CLIP", "text_encoder")
"""Where under A1111's ``models/`` T5 files are looked for: A1111's own folder, and ComfyUI's / Forge's."""
SCAN_DEPTH = 2  # models/CLIP/*.safetensors and one level of subfolders (ComfyUI users sort files into some)

Layout = Mapping[str, tuple[int, ...]]


def encoder_layout(config: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of A1111's T5 encoder (``other_impls.T5``: inner dim = d_model) for ``config``;
    the embedding under :data:`EMBEDDING_KEYS` [0]."""
    d, ff, heads = config["d_model"], config["d_ff"], config["num_heads"]
    layout: dict[str, tuple[int, ...]] = {EMBEDDING_KEYS[0]: (config["vocab_size"], d)}
    for i in range(config["num_layers"]):
        block = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            layout[f"{block}.0.SelfAttention.{name}.weight"] = (d, d)
        layout[f"{block}.0.SelfAttention.o.weight"] = (d, d)
        if i == 0:
            layout[f"{block}.0.SelfAttention.relative_attention_bias.weight"] = (RELATIVE_BUCKETS, heads)
        layout[f"{block}.0.layer_norm.weight"] = (d,)
        layout[f"{block}.1.DenseReluDense.wi_0.weight"] = (ff, d)
        layout[f"{block}.1.DenseReluDense.wi_1.weight"] = (ff, d)
        layout[f"{block}.1.DenseReluDense.wo.weight"] = (d, ff)
        layout[f"{block}.1.layer_norm.weight"] = (d,)
    layout["encoder.final_layer_norm.weight"] = (d,)
    return layout


@dataclasses.dataclass(frozen=True)
class T5FileCheck:
    """What one file in models/CLIP is, for T5's purposes."""

    name: str
    state: str  # "missing" | "published" | "own" (a usable T5 encoder, not the published bytes) | "unusable"
    detail: str
    precision: str | None = None  # fp16 | bf16 | fp32 | fp8 | fp8 scaled | mixed ...
    size: int | None = None
    foreign: bool = False  # a sound safetensors file of something else (CLIP, a VAE): no T5 tensor in it

    @property
    def usable(self) -> bool:
        return self.state in ("published", "own")


def precision_of(header: Header, layout: Layout) -> str:
    """The Linear weights' dtype, with "scaled" where scale tensors come with them."""
    linear = [key for key, shape in layout.items() if len(shape) == 2 and key not in EMBEDDING_KEYS
              and "relative_attention_bias" not in key]
    dtypes = sorted({PRECISIONS.get(header.tensors[key].dtype, header.tensors[key].dtype) for key in linear
                     if key in header.tensors})
    name = dtypes[0] if len(dtypes) == 1 else "mixed " + "/".join(dtypes)
    scaled = SCALED_MARKER in header.tensors or any(key.rsplit(".", 1)[-1] in SCALE_SUFFIXES for key in header.tensors)
    return f"{name} scaled" if scaled else name


def layout_problem(header: Header, layout: Layout) -> str | None:
    """Why ``header`` is not a T5 encoder of ``layout`` (None: it is): a missing key or a wrong shape."""
    tensors = header.tensors
    embedding = next((key for key in EMBEDDING_KEYS if key in tensors), None)
    if embedding is None:
        return f"no token embedding ({' or '.join(EMBEDDING_KEYS)}): not a T5 encoder file"
    missing, wrong = [], []
    for key, shape in layout.items():
        found = tensors.get(embedding if key == EMBEDDING_KEYS[0] else key)
        if found is None:
            missing.append(key)
        elif found.shape != tuple(shape):
            wrong.append(f"{key} is {list(found.shape)}, expected {list(shape)}")
    if missing:
        return f"{len(missing)} T5 encoder tensors missing, e.g. {missing[0]}"
    if wrong:
        return f"{len(wrong)} tensors of the wrong shape (another model size?), e.g. {wrong[0]}"
    return None


def check_t5_file(path: Path, known: KnownFile | None, layout: Layout) -> T5FileCheck:
    """Missing, the published file (by size: ``--hash`` in the doctor checks its digest), a usable
    encoder of another origin, or unusable, with the reason."""
    name = path.name
    if not path.is_file():
        return T5FileCheck(name, "missing", "missing")
    try:
        size = path.stat().st_size
        header = read_header(path)
    except ValueError as error:
        return T5FileCheck(name, "unusable", f"corrupt: {error}")
    except OSError as error:
        return T5FileCheck(name, "unusable", f"cannot be read: {error.strerror or error}")
    if header.extent > size:
        return T5FileCheck(name, "unusable", f"truncated: {size:,} of {header.extent:,} bytes", size=size)
    if header.extent < size:
        return T5FileCheck(name, "unusable", f"corrupt: {size - header.extent:,} bytes beyond the tensor data",
                           size=size)
    problem = layout_problem(header, layout)
    if problem is not None:
        return T5FileCheck(name, "unusable", problem, size=size, foreign=not has_t5_tensors(header))
    precision = precision_of(header, layout)
    if known is not None and known.size == size:
        return T5FileCheck(name, "published", f"the published file by size ({precision})", precision, size)
    published = f" ({known.size:,} bytes)" if known is not None and known.size else ""
    return T5FileCheck(name, "own", f"a T5-XXL encoder ({precision}, {size:,} bytes), not the published file"
                                    f"{published}: used as it is, never replaced", precision, size)


def has_t5_tensors(header: Header) -> bool:
    """Whether any tensor is named like a T5 encoder's: without one the file is something else
    (CLIP-L/G beside T5 in models/CLIP), not a broken T5."""
    return any(key in EMBEDDING_KEYS or key.startswith("encoder.block.") for key in header.tensors)


def safetensors_files(folder: Path, depth: int = SCAN_DEPTH) -> list[Path]:
    """``*.safetensors`` in ``folder`` and its subfolders down to ``depth`` levels (links followed),
    sorted; hidden folders skipped. A download in progress is a ``.part``, never listed."""
    found: list[Path] = []
    base = len(Path(folder).parts)
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(Path(root).parts) - base < depth - 1 else []
        found += [Path(root) / f for f in sorted(files) if f.endswith(".safetensors")]
    return found


def known_row(path: Path, rows: Iterable[KnownFile]) -> KnownFile | None:
    """The table row to judge ``path`` against: the one of its name, else the one of its exact size
    (the published bytes under another name are the published file), else None."""
    rows = tuple(rows)
    named = next((row for row in rows if row.filename == path.name), None)
    if named is not None:
        return named
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return next((row for row in rows if row.size == size), None)
