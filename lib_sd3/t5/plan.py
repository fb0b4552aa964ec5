"""What T5-XXL to attach, at which precision, and whether to download a file: one pure decision, and why.

Start-up, every model load, a changed setting, ``POST /sd3/t5/fetch`` and a finished download all ask
:func:`plan_t5` the same question with what they see (the mode asked for, the file picked in settings,
the usable T5 files on disk, free memory) and act on its answer.

The rule: the user's own file wins. ``auto`` never downloads while a usable T5 file is on disk, even
where a wider precision would fit (an fp8 file is used as fp8, not replaced by a 9.8 GB fp16 download);
a download starts only when no usable file is there, or when the user asks for a precision that no
file has (``fp16`` with only an fp8 file: the fp8 file serves meanwhile). An fp16 / bf16 / fp32 file
also serves fp8 (rounded at load). A precision that does not fit free memory is never attached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from lib_sd3.t5 import FILES, MODES, RESIDENT_BYTES, choose_mode

PICK_SETTING = "T5-XXL file"
"""The setting that picks one file among several (its label, as the messages name it)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A usable T5-XXL encoder file on disk (:mod:`lib_sd3.t5.file_check` said so from its header)."""

    key: str  # how status and the setting name it: its path under models/CLIP, or text_encoder/...
    path: Path
    precision: str  # the Linear weights' dtype: fp16 | bf16 | fp32 | fp8 | fp8 scaled | mixed ...
    published: bool  # the published bytes (by size)

    @property
    def narrow(self) -> bool:
        """fp8 weights: the file serves fp8 only (widening them would add bytes, not precision)."""
        return "fp8" in self.precision

    def describe(self) -> str:
        return f"{self.key} ({self.precision}, {'the published file' if self.published else 'your own file'})"


@dataclasses.dataclass(frozen=True)
class T5Plan:
    mode: str  # what will be attached: fp16 | fp8 | off
    load: Candidate | None  # the file to attach (None: T5 stays off for now)
    fp8: bool  # keep Linear weights in fp8 when loading
    fetch: str | None  # a published file to download in the background
    reason: str  # one line: what, from which file, and why


def ordered(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The order files are preferred in: published files first, then as listed (folder, then name)."""
    return sorted(candidates, key=lambda c: not c.published)


def plan_t5(requested: str, candidates: Sequence[Candidate], free_ram: int, free_vram: int | None,
            picked: str = "", downloads: bool = True) -> T5Plan:
    """Decide T5 for one moment: ``requested`` is auto | fp16 | fp8 | off, ``candidates`` the usable
    files, ``picked`` the file named in the ``T5-XXL file`` setting (empty: pick automatically),
    ``downloads`` whether downloads are allowed now (only the reason's words depend on it: the file
    is still named in ``fetch``, and the download says it cannot start and how to get it by hand)."""
    if requested not in MODES:
        raise ValueError(f"T5 mode {requested!r}; allowed: {list(MODES)}")
    memory = choose_mode(requested, free_ram, free_vram)
    if memory.mode == "off":
        return T5Plan("off", None, False, None, memory.reason)
    pool, note = ordered(candidates), ""
    match = [c for c in pool if picked and picked in (c.key, c.path.name)]
    if match:
        pool, why = match[:1], f"picked in the '{PICK_SETTING}' setting"
    else:
        if picked:
            note = f"; '{picked}' (the '{PICK_SETTING}' setting) is not a usable T5-XXL file here, so one was picked"
        why = ("the only T5-XXL file here" if len(pool) == 1 else
               f"preferred of {len(pool)} T5-XXL files: {', '.join(c.key for c in pool)}; the "
               f"'{PICK_SETTING}' setting picks another")
    if not pool:
        wanted = FILES[memory.mode]
        return T5Plan(memory.mode, None, memory.mode == "fp8", wanted,
                      f"{memory.reason}; no T5-XXL file here: {wanted} "
                      f"{'is downloaded' if downloads else 'is needed, and downloads are off'}{note}")
    wide = [c for c in pool if not c.narrow]
    narrow = [c for c in pool if c.narrow]
    if memory.mode == "fp8":  # native fp8 first: no rounding at load
        chosen = (narrow or wide)[0]
        return T5Plan("fp8", chosen, True, None, f"{memory.reason}; from {chosen.describe()}, {why}{note}")
    if wide:
        chosen = wide[0]
        return T5Plan("fp16", chosen, False, None, f"{memory.reason}; from {chosen.describe()}, {why}{note}")
    chosen = narrow[0]
    fp8_line = choose_mode("fp8", free_ram, free_vram).reason
    if requested == "auto":
        return T5Plan("fp8", chosen, True, None,
                      f"{fp8_line}; from {chosen.describe()}, {why}{note}; fp16 would fit too, but auto keeps to "
                      f"the file you have: set 'T5-XXL text encoder' to fp16 to download {FILES['fp16']} "
                      f"({RESIDENT_BYTES['fp16'] / 1e9:.1f} GB)")
    if match:
        return T5Plan("fp8", chosen, True, None, f"{fp8_line}; from {chosen.describe()}, {why}{note}; it has fp8 "
                                                 "weights, so it serves as fp8 (no download while it is picked)")
    wanted = f"until {FILES['fp16']} (fp16, asked for) is downloaded" if downloads else \
        f"as fp16 (asked for) needs {FILES['fp16']}, and downloads are off"
    return T5Plan("fp8", chosen, True, FILES["fp16"], f"{fp8_line}; from {chosen.describe()}, {why}{note}, {wanted}")
