"""A safetensors file read with plain reads, one tensor at a time: the header for the doctor and the
T5 file check, the tensors for loading T5.

Why not ``safetensors.safe_open``: it maps the whole file, and every page a conversion touches
stays resident in the process until the file is closed. Making fp8 T5 from the 9.8 GB fp16 file
that way peaked at ~18 GB resident (the mapped fp16 file plus the fp8 copy being built). Reading
each tensor into its own buffer keeps the peak at what is kept plus one tensor.
The header parse is standard library only (the doctor runs without torch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; beyond it the file is not safetensors
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F16, BF16, F32, F8_E4M3, ...
    shape: tuple[int, ...]
    start: int  # absolute file offsets of the tensor's bytes
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    extent: int  # the file length the header promises (8 + header + tensor data)


def read_header(path: Path | str) -> Header:
    """Parse the header; ValueError when the start of the file is not one (an HTML page saved under
    the right name, a zero-filled pre-allocation, another format)."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > MAX_HEADER_BYTES:
            raise ValueError("not a safetensors file (bad header length)")
        raw = file.read(header_len)
    if len(raw) < header_len:
        raise ValueError("header cut short")
    base = 8 + header_len
    try:
        header = json.loads(raw)
        tensors = {key: TensorInfo(str(entry["dtype"]), tuple(int(n) for n in entry["shape"]),
                                   base + int(entry["data_offsets"][0]), base + int(entry["data_offsets"][1]))
                   for key, entry in header.items() if key != "__metadata__"}
        metadata = dict(header.get("__metadata__") or {})
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise ValueError(f"not a safetensors file (header: {error.__class__.__name__})") from None
    return Header(tensors, metadata, max((t.end for t in tensors.values()), default=base))


def _torch_dtype(name: str) -> Any:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
            "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}[name]


class SafetensorsReader:
    """``with SafetensorsReader(path) as f: f.get_tensor(key)``: each tensor read into its own memory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        self._fd: int | None = None

    def __enter__(self) -> SafetensorsReader:
        self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get_tensor(self, key: str) -> Any:
        import torch

        info = self.header.tensors[key]
        buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
        view, offset = memoryview(buffer.numpy()), info.start
        while view:
            read = os.preadv(self._fd, [view], offset) if hasattr(os, "preadv") else self._read_at(view, offset)
            if read <= 0:
                raise ValueError(f"{self.path.name}: {key} cut short (file truncated?)")
            view, offset = view[read:], offset + read
        return buffer.view(_torch_dtype(info.dtype)).reshape(info.shape)

    def _read_at(self, view: memoryview, offset: int) -> int:  # Windows: no preadv
        data = os.pread(self._fd, len(view), offset) if hasattr(os, "pread") else self._seek_read(len(view), offset)
        view[:len(data)] = data
        return len(data)

    def _seek_read(self, length: int, offset: int) -> bytes:
        os.lseek(self._fd, offset, os.SEEK_SET)
        return os.read(self._fd, length)
