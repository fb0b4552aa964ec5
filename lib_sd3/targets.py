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
    SourceTarget("models.BaseModel", ("modules/models/sd3/sd3_model.py",), r"^class SD3Inferencer\b",
                 "SD3.5 Large / Medium built with their own MMDiT (qk-norm, MMDiT-X)"),
    SourceTarget("models.load_model_weights", ("modules/sd_models.py",), r"^def load_model_weights\(",
                 "SD3 checkpoints checked key by key before loading; the previous model kept on a bad file"),
    SourceTarget("models.checkpoint_option", ("modules/options.py",), r"^\s+def set\(self, key, value",
                 "a checkpoint refused by the header check: HTTP 422 from /sdapi/v1/options, one console line"),
    SourceTarget("mixdq.load_model_weights", ("modules/sd_models.py",), r"^def load_model_weights\(",
                 "MixDQ float layers restored before A1111 loads new weights"),
    SourceTarget("api.script_args", ("modules/api/api.py",), r"^\s+def init_script_args\(",
                 "bad SD3 script args from the API answered with HTTP 422"),
    SourceTarget("slg.combine_denoised", ("modules/sd_samplers_cfg_denoiser.py",), r"^\s+def combine_denoised\(",
                 "skip-layer guidance added to CFG"),
    SourceTarget("early.get_first_stage_encoding", ("modules/models/sd3/sd3_model.py",), r"^class SD3Inferencer\b",
                 "early SD3 branch: img2img and hires fix encode images (dev has it)"),
    SourceTarget("early.dtype", ("modules/models/sd3/sd3_model.py",), r"^class SD3Inferencer\b",
                 "early SD3 branch: the inpainting mask's dtype (dev does not need it)"),
    SourceTarget("early.inpainting_mask", ("modules/processing.py",), r"^class StableDiffusionProcessingImg2Img\b",
                 "early SD3 branch: the inpainting mask in SD3's 16 latent channels (dev has it)"),
    SourceTarget("early.fix_dimensions", ("modules/processing.py",), r"^def process_images_inner\(",
                 "early SD3 branch: sizes rounded to multiples of 16 (dev has it)"),
    SourceTarget("early.long_prompts", ("modules/models/sd3/sd3_cond.py", "modules/models/sd3/sd3_model.py"),
                 r"^class SD3Cond\b", "early SD3 branch: prompts over 75 CLIP tokens, BREAK, emphasis (dev has it)"),
    SourceTarget("lora.load_network", ("extensions-builtin/Lora/networks.py",), r"^def load_network\(",
                 "SD3 / SD3.5 LoRA files in every layout through the built-in Lora extension"),
    SourceTarget("lora.card_version", ("extensions-builtin/Lora/ui_extra_networks_lora.py",),
                 r"^\s+def create_item\(", "SD3 LoRAs shown as SD3 on the Lora tab"),
    SourceTarget("lora.weightless_layers", ("extensions-builtin/Lora/networks.py",), r"^def network_apply_weights\(",
                 "LoRA on SD3 without a crash at weightless norms (early SD3 branch)"),
    SourceTarget("controlnet_extension.main_entry", ("modules/scripts.py",), r"^class ScriptRunner\b",
                 "the ControlNet extension's panel on SD3: its units drive our ControlNet instead of its assert"),
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
