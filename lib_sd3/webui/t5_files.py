"""The T5-XXL files on this WebUI's disk, as the doctor sees them: published, the user's own, unusable, missing.

Every ``*.safetensors`` in ``models/CLIP`` and ``models/text_encoder`` (and one level of subfolders) whose
header :mod:`lib_sd3.t5.file_check` recognises as a T5-XXL encoder is a candidate, whatever its name: ComfyUI's
``t5xxl_fp8_e4m3fn_scaled.safetensors``, Stability's ``t5xxl.safetensors``, ``google_t5-v1_1-xxl_encoderonly-
fp16.safetensors``. Only headers are read, once per file version (size, mtime, inode). A file that looks
like T5 but cannot be used is said once in the console and skipped; CLIP-L/G and other models beside it
are not T5 and pass in silence.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from lib_sd3 import get_logger
from lib_sd3.fetch.known_files import T5_FP8, T5_FP16
from lib_sd3.t5.file_check import FOLDERS, T5FileCheck, check_t5_file, known_row, safetensors_files
from lib_sd3.t5.plan import Candidate
from lib_sd3.webui.t5_model import expected_layout, file_identity
from lib_sd3.webui.text_encoder_fetch import FetchSetup, clip_dir, models_dir

log = get_logger("t5")

PUBLISHED = (T5_FP16, T5_FP8)
"""The names the extension downloads to (models/CLIP): always listed in the status, present or not."""


class T5Files:
    """Which T5 files are on disk and what each one is; each judgement said once in the console."""

    def __init__(self, setup: FetchSetup) -> None:
        self.setup = setup
        self._lock = threading.Lock()
        self._said: set[tuple] = set()  # files already described in the console
        self._judged: dict[Path, tuple[tuple | None, T5FileCheck]] = {}  # path -> (identity, check)

    def key_of(self, path: Path) -> str:
        """The name status and the setting use: the path under models/CLIP, else under models/."""
        for base in (clip_dir(), models_dir()):
            try:
                return path.relative_to(base).as_posix()
            except ValueError:
                continue
        return str(path)

    def check(self, name: str) -> T5FileCheck:
        """One of the published names in models/CLIP (where a download would go)."""
        return self._judge(clip_dir() / name)

    def scan(self) -> dict[str, T5FileCheck]:
        """Key -> check for the published names (present or not) and every T5-like file in the folders."""
        return {check.name: check for _, check in self._found()}

    def candidates(self) -> list[Candidate]:
        """Every usable T5-XXL file, in folder and name order."""
        return [Candidate(check.name, path, check.precision or "?", check.state == "published")
                for path, check in self._found() if check.usable]

    def _found(self) -> list[tuple[Path, T5FileCheck]]:
        found = {name: (clip_dir() / name, self.check(name)) for name in PUBLISHED}
        for folder in FOLDERS:
            for path in safetensors_files(models_dir() / folder):
                check = self._judge(path)
                if check.name not in found and not check.foreign:
                    found[check.name] = (path, check)
        return list(found.values())

    def _judge(self, path: Path) -> T5FileCheck:
        identity = file_identity(path)
        with self._lock:
            cached = self._judged.get(path)
        if cached is not None and cached[0] == identity and identity is not None:
            return cached[1]
        key = self.key_of(path)
        try:
            layout = expected_layout()
        except Exception as error:  # no A1111 T5 to compare with: nothing can be loaded anyway
            return T5FileCheck(key, "unusable" if path.is_file() else "missing", f"no T5 in this A1111: {error!r}")
        rows = [row for name in PUBLISHED for row in self.setup.sources[name][:1]]
        check = dataclasses.replace(check_t5_file(path, known_row(path, rows), layout), name=key)
        with self._lock:
            self._judged[path] = (identity, check)
        self._say_once(path, identity, check)
        return check

    def _say_once(self, path: Path, identity: tuple | None, check: T5FileCheck) -> None:
        if check.state not in ("own", "unusable") or check.foreign:
            return
        with self._lock:
            if (path, identity, check.state) in self._said:
                return
            self._said.add((path, identity, check.state))
        if check.usable:
            log.warning("%s: %s", path, check.detail)
        elif path.name in PUBLISHED and path.parent == clip_dir():
            log.warning("%s: %s; not used and left alone (move it away to have the published file fetched)",
                        path, check.detail)
        else:
            log.warning("%s: %s; skipped as a T5-XXL file", path, check.detail)
