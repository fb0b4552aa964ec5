"""Where in A1111's source each of our patches takes hold, for checking a checkout without running it.

The running WebUI checks its targets with ``hasattr`` in each patch's ``detect()``; the doctor
cannot import A1111 (no venv, or a broken one), so it looks for the same things in the source
text. A feature that adds a patch adds its row here, named like the patch in the registry, so
``python -m lib_sd3 doctor`` tells a user before start-up which features their A1111 can carry.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class SourceTarget:
    patch: str  # the patch (in lib_sd3.webui.registry.REGISTRY) that needs this target
    files: tuple[str, ...]  # relative to the A1111 root; the target may live in any of them
    pattern: str  # a regex matched line by line (re.MULTILINE)
    what: str  # what the patch changes, for the user


TARGETS: tuple[SourceTarget, ...] = (
    SourceTarget("token_counter", ("modules/sd_hijack.py",), r"^\s+def get_prompt_lengths\(",
                 "prompt token counter"),
    SourceTarget("sd3_cond", ("modules/models/sd3/sd3_cond.py", "modules/models/sd3/sd3_model.py"),
                 r"^class SD3Cond\b", "SD3 text conditioning (T5, token counts)"),
    SourceTarget("timestep_samplers", ("modules/sd_samplers_timesteps.py",), r"^samplers_timesteps\s*=\s*\[",
                 "DDIM / PLMS / UniPC on rectified flow"),
    SourceTarget("schedulers", ("modules/sd_schedulers.py",), r"^schedulers\s*=\s*\[",
                 "schedules (AYS and others) on rectified flow"),
    SourceTarget("script_before_every_sampling", ("modules/scripts.py",),
                 r"^\s+def process_before_every_sampling\(", "script hook run before each sampling pass"),
    SourceTarget("text_encoder_download", ("modules/modelloader.py",),
                 r"^def load_file_from_url\(|^from \S+ import [^\n]*\bload_file_from_url\b",
                 "text-encoder downloads (resume, verify, mirrors)"),
)


def locate(root: Path, target: SourceTarget) -> str | None:
    """The first of ``target.files`` under ``root`` whose text matches, or None."""
    pattern = re.compile(target.pattern, re.MULTILINE)
    for relative in target.files:
        path = root / relative
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if pattern.search(text):
            return relative
    return None
