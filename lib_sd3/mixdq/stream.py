"""Read a safetensors file one tensor at a time with plain file reads.

``safetensors.safe_open`` maps the whole file: every tensor read leaves its pages resident in the
process until the map closes, so streaming a 16 GB checkpoint through it still peaks at 16 GB of
resident memory. Here each tensor is read into its own buffer with ``readinto`` and the page cache
stays the kernel's to reclaim. The format is 8 bytes of header length, a JSON header (name ->
dtype, shape, byte offsets), then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, **{code: getattr(torch, name) for code, name in (("F8_E4M3", "float8_e4m3fn"),
                                                                                ("F8_E5M2", "float8_e5m2"))
                                 if hasattr(torch, name)}}  # PyTorch < 2.1 has no float8
MAX_HEADER_BYTES = 100 << 20  # the format's own limit


class SafetensorsReader:
    """``with SafetensorsReader(path) as r: r.get(name)`` -> a CPU tensor owning its memory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file: BinaryIO | None = None
        self.header: dict[str, dict] = {}
        self.data_start = 0

    def __enter__(self) -> SafetensorsReader:
        self.file = open(self.path, "rb")  # noqa: SIM115 -- closed in __exit__
        (length,) = struct.unpack("<Q", self.file.read(8))
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ValueError(f"{self.path.name} is not a safetensors file (header length {length})")
        header = json.loads(self.file.read(length))
        header.pop("__metadata__", None)
        self.header, self.data_start = header, 8 + length
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        out = torch.empty(entry["shape"], dtype=dtype)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(bytearray())
        if len(view) != end - begin:
            raise ValueError(f"{self.path.name}: {name} has {end - begin} bytes for shape {entry['shape']}")
        self.file.seek(self.data_start + begin)
        if self.file.readinto(view) != end - begin:
            raise ValueError(f"{self.path.name} is truncated (reading {name})")
        return out
