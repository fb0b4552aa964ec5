"""Where SD3 ControlNet files are, and which one a unit names.

Folders: ``models/ControlNet`` (shared with the ControlNet extension), the extension's "Extra path to scan for
ControlNet models" setting (``control_net_models_path``) and its ``--controlnet-dir`` flag, when set. Only files
whose header is an SD3 ControlNet are offered (reading a header costs a few milliseconds; results are kept per
file size and modification time). A unit names a file by its name without extension (what the dropdown shows),
its file name, ``name [hash]`` or a short hash, like A1111's checkpoints. Hashes are A1111's (``modules.hashes``,
cached in its ``cache.json``): computed on first use of a file unless ``--no-hashing``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lib_sd3.controlnet.detect import ControlNetError, ControlNetFile, inspect
from lib_sd3.webui.capabilities import a1111_module, a1111_option

SUFFIX = ".safetensors"
HASH = re.compile(r"^[0-9a-fA-F]{8,64}$")
NAMED_WITH_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]$")


@dataclasses.dataclass(frozen=True)
class FoundFile:
    name: str  # relative to its folder, without extension: what the dropdown and the infotext show
    path: Path
    file: ControlNetFile


class ControlNetFiles:
    """The SD3 ControlNets in the folders, read again at every :meth:`scan` (headers kept per size/mtime)."""

    def __init__(self) -> None:
        self._inspected: dict[tuple[str, int, int], ControlNetFile | ControlNetError] = {}

    @staticmethod
    def folders() -> list[Path]:
        models = getattr(a1111_module("modules.paths_internal"), "models_path", None)
        cmd_opts = getattr(a1111_module("modules.shared"), "cmd_opts", None)
        candidates = [Path(models) / "ControlNet" if models else None,
                      a1111_option("control_net_models_path", "") or None,
                      getattr(cmd_opts, "controlnet_dir", None) or None]
        seen: dict[Path, Path] = {}
        for folder in candidates:
            if folder is not None and Path(folder).is_dir():
                seen.setdefault(Path(folder).resolve(), Path(folder))
        return list(seen.values())

    def _inspect(self, path: Path) -> ControlNetFile | ControlNetError:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._inspected:
            try:
                self._inspected[key] = inspect(path)
            except ControlNetError as error:
                self._inspected[key] = error
        return self._inspected[key]

    def scan(self) -> tuple[list[FoundFile], dict[str, str]]:
        """(the SD3 ControlNets found, in name order; file name -> why it is not offered, for the others)."""
        found: dict[str, FoundFile] = {}
        skipped: dict[str, str] = {}
        for folder in self.folders():
            for path in sorted(folder.rglob(f"*{SUFFIX}")):
                name = path.relative_to(folder).with_suffix("").as_posix()
                try:
                    result = self._inspect(path)
                except OSError as error:
                    result = ControlNetError(f"{path.name}: cannot read it ({error.strerror or error})")
                if isinstance(result, ControlNetError):
                    skipped[name] = str(result)
                elif name not in found:
                    found[name] = FoundFile(name, path, result)
        return sorted(found.values(), key=lambda f: f.name.lower()), skipped

    def names(self) -> list[str]:
        return [f.name for f in self.scan()[0]]

    def find(self, wanted: str) -> FoundFile:
        """The file a unit names; :class:`ControlNetError` (one line) if none, or if it is not usable."""
        files, skipped = self.scan()
        match = NAMED_WITH_HASH.match(wanted)
        name = match["name"] if match else wanted
        for candidate in (name, name.removesuffix(SUFFIX)):
            for f in files:
                if candidate in (f.name, f.path.name, Path(f.name).name):
                    return f
            if candidate in skipped:
                raise ControlNetError(skipped[candidate])
        short = (match["hash"] if match else wanted if HASH.match(wanted) else "").lower()
        if short:
            for f in files:
                full = sha256(f, compute=True)
                if full and full.startswith(short):
                    return f
        where = ", ".join(str(folder) for folder in self.folders()) or "models/ControlNet (not found)"
        raise ControlNetError(f"no SD3 ControlNet named {wanted!r} in {where} (GET /sd3/controlnet lists them)")


def sha256(found: FoundFile, compute: bool) -> str | None:
    """A1111's sha256 of the file (its cache first); None where hashing is off or A1111's hashes are missing."""
    hashes = a1111_module("modules.hashes")
    if hashes is None:
        return None
    title = f"controlnet/{found.name}"
    cached = hashes.sha256_from_cache(str(found.path), title) if hasattr(hashes, "sha256_from_cache") else None
    if cached or not compute or getattr(getattr(a1111_module("modules.shared"), "cmd_opts", None), "no_hashing", False):
        return cached
    return hashes.sha256(str(found.path), title)


def short_hash(found: FoundFile) -> str | None:
    full = sha256(found, compute=True)
    return full[:10] if full else None


def describe(found: FoundFile) -> dict[str, Any]:
    """One file for ``GET /sd3/controlnet``."""
    file = found.file
    return {"name": found.name, "file": str(found.path), "type": file.control_type.label,
            "base": file.config.base_name, "blocks": file.config.depth, "bytes": found.path.stat().st_size,
            "sha256": sha256(found, compute=False)}
