"""Loaded ControlNets kept across generations: 4.3 GB each in fp16, so loaded once, and let go on purpose.

A model is kept under its file's identity (resolved path, size, modification time) and the dtype and device
it was loaded in: a file replaced on disk, or another dtype, loads anew. Every request is checked against the
base it will steer (:func:`~lib_sd3.controlnet.detect.check_base`) before anything is loaded. The owner
releases what a generation did not use (:meth:`ControlNetCache.keep_only`) and everything when the base
model changes (:meth:`ControlNetCache.clear`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lib_sd3 import get_logger
from lib_sd3.controlnet.detect import ControlNetError, ControlNetFile, check_base, inspect
from lib_sd3.controlnet.load import AnyControlNet, load_controlnet
from lib_sd3.mixdq.model import module_bytes
from lib_sd3.mixdq.model import state as mixdq_state
from lib_sd3.models.families import MMDiTConfig

log = get_logger("controlnet")


@dataclasses.dataclass(frozen=True)
class CacheKey:
    path: str
    size: int
    mtime_ns: int
    dtype: torch.dtype
    device: str


def key_of(path: str | Path, dtype: torch.dtype, device: torch.device | str) -> CacheKey:
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
    except OSError as error:
        raise ControlNetError(f"{Path(path).name}: cannot read it ({error.strerror or error})") from None
    return CacheKey(str(resolved), stat.st_size, stat.st_mtime_ns, dtype, str(torch.device(device)))


class ControlNetCache:
    """``get(path, base, base_label, dtype, device)`` -> (file, model), loading only what is not kept."""

    def __init__(self) -> None:
        self._models: dict[CacheKey, tuple[ControlNetFile, AnyControlNet]] = {}

    def get(self, path: str | Path, base: MMDiTConfig, base_label: str, dtype: torch.dtype = torch.float16,
            device: torch.device | str = "cpu") -> tuple[ControlNetFile, AnyControlNet]:
        key = key_of(path, dtype, device)
        if key in self._models:
            check_base(self._models[key][0].config, base, base_label, Path(path).name)
        else:
            check_base(inspect(path).config, base, base_label, Path(path).name)  # before reading gigabytes
            self._models[key] = load_controlnet(path, dtype=dtype, device=device)
        return self._models[key]

    def keep_only(self, keys: set[CacheKey]) -> list[str]:
        """Release every model not in ``keys``; the names released."""
        gone = [key for key in self._models if key not in keys]
        for key in gone:
            del self._models[key]
        if gone:
            log.info("ControlNet released: %s", ", ".join(Path(key.path).name for key in gone))
        return [Path(key.path).name for key in gone]

    def clear(self) -> list[str]:
        return self.keep_only(set())

    def loaded(self) -> list[dict[str, object]]:
        """What is kept, for a status route: name, type, dtype, device and bytes."""
        return [{"name": Path(key.path).name, "type": file.control_type.label, "dtype": str(key.dtype),
                 "device": key.device, "bytes": module_bytes(model),
                 "mixdq": state.config.name if (state := mixdq_state(model)) is not None else None}
                for key, (file, model) in self._models.items()]

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._models

    def __len__(self) -> int:
        return len(self._models)
