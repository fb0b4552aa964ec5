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
    SourceTarget("tokens.get_prompt_lengths", ("modules/sd_hijack.py",), r"^\s+def get_prompt_lengths\(",
                 "prompt token counter (CLIP and T5 counts for SD3)"),
    SourceTarget("t5.sd3_cond", ("modules/models/sd3/sd3_cond.py", "modules/models/sd3/sd3_model.py"),
                 r"^class SD3Cond\b", "SD3 text conditioning: T5 fetched, attached without restart"),
    SourceTarget("samplers.create_sampler", ("modules/sd_samplers.py",), r"^def create_sampler\(",
                 "DDIM / PLMS / UniPC and the noise-injecting samplers on rectified flow"),
    SourceTarget("samplers.schedulers", ("modules/sd_schedulers.py",), r"^schedulers\s*=\s*\[",
                 "schedules (AYS and others) in flow space"),
    SourceTarget("samplers.nan_guard", ("modules/models/sd3/sd3_model.py",), r"^class SD3Denoiser\b",
                 "NaN guard around the SD3 denoiser"),
    SourceTarget("iclight.hooks", ("modules/scripts.py",), r"^class ScriptRunner\b",
                 "IC-Light hooks wrapped in the script runners"),
    SourceTarget("mixdq.load_model_weights", ("modules/sd_models.py",), r"^def load_model_weights\(",
                 "MixDQ float layers restored before A1111 loads new weights"),
    SourceTarget("lora.load_network", ("extensions-builtin/Lora/networks.py",), r"^def load_network\(",
                 "SD3 / SD3.5 LoRA files in every layout through the built-in Lora extension"),
    SourceTarget("lora.card_version", ("extensions-builtin/Lora/ui_extra_networks_lora.py",),
                 r"^\s+def create_item\(", "SD3 LoRAs shown as SD3 on the Lora tab"),
    SourceTarget("lora.weightless_layers", ("extensions-builtin/Lora/networks.py",), r"^def network_apply_weights\(",
                 "LoRA on SD3 without a crash at weightless norms (early SD3 branch)"),
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
