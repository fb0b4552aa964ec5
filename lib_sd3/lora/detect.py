"""Is a LoRA file for SD3 / SD3.5? From its metadata where trainers write it, else from its key names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

METADATA_MARKERS: tuple[tuple[str, str], ...] = (
    ("modelspec.architecture", "stable-diffusion-3"),  # SAI model spec, kohya writes e.g. stable-diffusion-3-medium/lora
    ("modelspec.architecture", "stable-diffusion-v3"),
    ("ss_base_model_version", "sd3"),
)
SD3_KEY_PARTS = ("joint_blocks", "context_block", "add_q_proj", "to_add_out", "ff_context")
FLUX_KEY_PARTS = ("single_transformer_blocks", "single_blocks", "double_blocks")  # same diffusers names as SD3


def from_metadata(metadata: Mapping[str, object]) -> bool:
    return any(marker in str(metadata.get(field, "")).lower() for field, marker in METADATA_MARKERS)


def from_keys(keys: Iterable[str]) -> bool:
    sd3 = False
    for key in keys:
        if any(part in key for part in FLUX_KEY_PARTS):
            return False
        sd3 = sd3 or any(part in key for part in SD3_KEY_PARTS)
    return sd3


def is_sd3_lora(keys: Iterable[str], metadata: Mapping[str, object]) -> bool:
    return from_metadata(metadata) or from_keys(keys)
