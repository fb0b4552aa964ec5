"""The "SD3" settings section, and which settings go into the infotext.

Every option that changes an image names its ``infotext`` label (from the one table in
:mod:`lib_sd3.webui.infotext`); :func:`infotext_params` writes it into each image's parameters. Pasting
an infotext restores the per-generation ones in the SD3 accordion (``infotext_fields``) and the rest,
such as T5, as A1111's "Override settings".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lib_sd3.webui import infotext, script_args
from lib_sd3.webui.capabilities import a1111_option

SECTION = ("sd3", "SD3")


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    label: str
    choices: tuple[str, ...] | None = None
    infotext: str | None = None  # set when the option changes the image
    comment: str = ""
    slider: tuple[float, float, float] | None = None  # (minimum, maximum, step): floats need a component in A1111


SETTINGS: tuple[Setting, ...] = (
    Setting("sd3_token_counter", True, "Show CLIP and T5 token counts for SD3 prompts"),
    Setting("sd3_t5_mode", "auto", "T5-XXL text encoder", ("auto", "fp16", "fp8", "off"), infotext=infotext.T5,
            comment="auto picks fp16 or fp8 from free memory, or off where neither fits"),
    Setting("sd3_t5_file", "", "T5-XXL file", comment="a file name in models/CLIP or models/text_encoder; empty: "
            "the published file, else the first T5-XXL file found (GET /sd3/t5 lists them)"),
    Setting("sd3_fetch", True, "Download missing T5-XXL and tokenizers in the background"),
    Setting("sd3_mirrors", "", "Hugging Face endpoints to try, in order (comma-separated; empty: HF_ENDPOINT or huggingface.co)"),
    Setting("sd3_flow_samplers", True, "Use flow-correct samplers and schedules for SD3", infotext=infotext.FLOW_SAMPLERS),
    Setting("sd3_nan_guard", True, "NaN guard: recompute a non-finite step at higher precision", infotext=infotext.NAN_GUARD),
    Setting("sd3_mixdq", "off", "MixDQ quantization of the SD3 MMDiT", ("off", "w8a8", "w4a8", "fp8"), infotext=infotext.MIXDQ),
    Setting("sd3_slg", False, "Skip-layer guidance (SLG): one more cond pass with some joint blocks skipped",
            comment="Stability recommends it for SD3.5 Medium; off unless turned on here, in the "
            "accordion or by a preset"),
    Setting("sd3_slg_layers", "7,8,9", "SLG: joint blocks to skip (comma-separated indices)"),
    Setting("sd3_slg_scale", 2.5, "SLG: scale", slider=script_args.BY_NAME["slg_scale"].slider),
    Setting("sd3_slg_start", 0.01, "SLG: first step, as a fraction of the steps (exclusive)",
            slider=script_args.BY_NAME["slg_start"].slider),
    Setting("sd3_slg_end", 0.20, "SLG: last step, as a fraction of the steps (exclusive)",
            slider=script_args.BY_NAME["slg_end"].slider),
    Setting("sd3_iclight_shim", True, "Keep the IC-Light extension from breaking generations"),
)

BY_KEY = {s.key: s for s in SETTINGS}


def register(shared: Any) -> None:
    """Add the section to A1111's settings page (called from ``on_ui_settings``)."""
    import gradio as gr

    for s in SETTINGS:
        component, args = None, None
        if s.choices:
            component, args = gr.Radio, {"choices": list(s.choices)}
        elif s.slider:
            component, args = gr.Slider, dict(zip(("minimum", "maximum", "step"), s.slider, strict=True))
        info = shared.OptionInfo(s.default, s.label, component, args, section=SECTION, infotext=s.infotext)
        if s.comment and hasattr(info, "info"):
            info = info.info(s.comment)
        shared.opts.add_option(s.key, info)


def get(key: str) -> Any:
    """Current value of one of our settings, falling back to its default outside the WebUI."""
    return a1111_option(key, BY_KEY[key].default)


def infotext_params(values: dict[str, Any]) -> dict[str, Any]:
    """Infotext entries for the image-changing settings among ``values`` (key -> value)."""
    return {BY_KEY[k].infotext: v for k, v in values.items() if k in BY_KEY and BY_KEY[k].infotext}
