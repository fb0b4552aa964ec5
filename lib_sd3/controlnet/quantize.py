"""MixDQ on a ControlNet: its Linear layers quantized by the config the base MMDiT runs with, undone with it.

An SD3.5 ControlNet block is the base's image-stream block (``x_block``) on its own, so the config's pattern rules
for ``joint_blocks.*.x_block.<layer>`` (``*_block`` included) apply to ``transformer_blocks.*.<layer>``. Entries
that name one block of the base (a calibrated per-layer config) describe the base's blocks, not the ControlNet's:
they are left out and those layers stay float. The embedders and the ``controlnet_blocks`` projections stay float,
as the base's embedders do. Restoring puts the float layers back bit for bit (:func:`lib_sd3.mixdq.model.restore`).

An SD3 Medium ControlNet in diffusers' layout (:mod:`.joint`) has the base's joint blocks under the base's names
(``joint_blocks.N.{context,x}_block.*``): the config's pattern rules for every block apply as they are, both
streams; per-block entries are left out for the same reason.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from lib_sd3.mixdq import model as mixdq_model
from lib_sd3.mixdq.config import BitConfig

_IMAGE_STREAM = re.compile(r"^joint_blocks\.\*\.(?:x|\*)_block\.(?P<layer>.+)$")
_EVERY_BLOCK = re.compile(r"^joint_blocks\.\*\.")


def controlnet_key(key: str, joint: bool = False) -> str | None:
    """The ControlNet pattern for a base config key, or None when the key does not carry over."""
    if joint:
        return key if _EVERY_BLOCK.match(key) else None
    match = _IMAGE_STREAM.match(key)
    return f"transformer_blocks.*.{match['layer']}" if match else None


def for_controlnet(config: BitConfig, joint: bool = False) -> BitConfig | None:
    """The config's rules moved onto a ControlNet's blocks (``joint``: a diffusers-layout one); None when none
    carries over."""
    def moved(entries: dict) -> dict:
        out = {}
        for key, value in entries.items():
            new = controlnet_key(key, joint)
            if new is not None:
                out.setdefault(new, value)
        return out

    weight = moved(config.weight)
    if not any(bits != 16 for bits in weight.values()):
        return None
    return dataclasses.replace(
        config, weight=weight, act={k: v for k, v in moved(config.act).items() if k in weight},
        act_protect=tuple(dict.fromkeys(k for key in config.act_protect if (k := controlnet_key(key, joint)))),
        act_scales=moved(config.act_scales), name=f"{config.name} (ControlNet)")


def follow_base(controlnet: nn.Module, base: nn.Module) -> str | None:
    """Bring ``controlnet`` to the MixDQ state of ``base`` (quantize, switch or restore); the config name it runs
    with now, or None (float)."""
    base_state = mixdq_model.state(base)
    joint = controlnet.config.joint
    wanted = for_controlnet(base_state.config, joint) if base_state is not None else None
    current = mixdq_model.state(controlnet)
    if (current.config.digest() if current else None) == (wanted.digest() if wanted else None):
        return wanted.name if wanted else None
    if current is not None:
        mixdq_model.restore(controlnet)
    if wanted is not None:
        mixdq_model.quantize(controlnet, wanted)
    return wanted.name if wanted else None
