"""The "SD3" settings section, and which settings go into the infotext.

The per-image options' settings are rows of the options table (:mod:`lib_sd3.webui.options`); the
rest (T5, downloads, the token counter, the IC-Light shim) are declared here. Every setting that changes
an image names its ``infotext`` label (from :mod:`lib_sd3.webui.infotext`); :func:`infotext_params`
writes it into each image's parameters. Pasting an infotext restores the per-image options in the SD3
accordion (``infotext_fields``) and the rest, such as T5, as A1111's "Override settings".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lib_sd3.t5 import MODES as T5_MODES
from lib_sd3.webui import infotext, options
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


def option_setting(option: options.Option) -> Setting:
    """A per-image option's row of the settings page, from the options table."""
    return Setting(option.setting_key, option.setting_default, option.setting_label, option.setting_choices,
                   infotext=options.setting_infotext(option), comment=option.comment,
                   slider=option.slider)


SETTINGS: tuple[Setting, ...] = (
    Setting("sd3_token_counter", True, "Show CLIP and T5 token counts for SD3 prompts"),
    Setting("sd3_t5_mode", "auto", "T5-XXL text encoder", T5_MODES, infotext=infotext.T5,
            comment="auto picks fp16 or fp8 from free memory, or off where neither fits"),
    Setting("sd3_t5_file", "", "T5-XXL file", comment="a file name in models/CLIP or models/text_encoder; empty: "
            "the published file, else the first T5-XXL file found (GET /sd3/t5 lists them)"),
    Setting("sd3_fetch", True, "Download missing T5-XXL and tokenizers in the background"),
    Setting("sd3_mirrors", "", "Hugging Face endpoints to try, in order (comma-separated; empty: HF_ENDPOINT or huggingface.co)"),
    *(option_setting(option) for option in options.OPTIONS if option.setting_key),
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
