"""The one sha256 helper: file digests for the downloader, the doctor and the tests.

Standard library only (the doctor runs without a working venv). Streaming updates while a file
downloads use ``hashlib`` directly in :mod:`lib_sd3.fetch`; whole files and byte strings come here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 8 << 20  # read unit: large enough that hashing, not syscalls, sets the pace


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_update_from_file(digest, path: Path, length: int | None = None) -> None:
    """Feed the first ``length`` bytes (all when None) of ``path`` into ``digest``."""
    with open(path, "rb") as fh:
        remaining = Path(path).stat().st_size if length is None else length
        while remaining > 0:
            data = fh.read(min(CHUNK_BYTES, remaining))
            if not data:
                raise OSError(f"{path} shorter than {length} bytes")
            digest.update(data)
            remaining -= len(data)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    sha256_update_from_file(digest, Path(path))
    return digest.hexdigest()
