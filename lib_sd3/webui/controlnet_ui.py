"""The ControlNet units in the SD3 accordion: one tab per unit, its fields from the options table, and a preview
of the preprocessed map (what the ControlNet will see, before the VAE)."""

from __future__ import annotations

from typing import Any

from lib_sd3 import get_logger
from lib_sd3.controlnet.preprocess import control_map
from lib_sd3.webui import infotext, options

log = get_logger("controlnet")

PREVIEW_SIDE = 1024
"""The preview is made at the control image's own size, at most this many pixels on its longer side."""

NOTE = ("SD3.5 Large ControlNets (blur, canny, depth) from models/ControlNet. A unit runs when a model is picked. "
        "In img2img a unit without a control image uses the init image (the blur ControlNet's upscaling recipe). "
        "Stability's depth ControlNet takes near = dark: invert depth maps made near = bright.")


def preview(image: Any, preprocessor: str, resize_mode: str, low: float, high: float, radius: float) -> Any:
    """The map a unit would make from ``image``, or an error shown in the UI."""
    import gradio as gr

    if image is None:
        return None
    scale = min(1.0, PREVIEW_SIDE / max(image.size))
    width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    params = {"canny": {"low": int(low), "high": int(high)}, "blur": {"radius": radius}}.get(preprocessor, {})
    try:
        return control_map(image, width, height, preprocessor, resize_mode, **params)
    except (ValueError, RuntimeError) as error:
        raise gr.Error(str(error)) from None


def unit(n: int, tab: str, model_names) -> dict[str, Any]:
    import gradio as gr

    def option(field: str) -> options.Option:
        return options.BY_NAME[f"controlnet_{n}_{field}"]

    def elem_id(field: str) -> str:
        return f"sd3_controlnet_{n}_{field}_{tab}"

    def dropdown(field: str) -> Any:
        o = option(field)
        return gr.Dropdown(label=o.label, choices=list(o.choices), value=o.setting_default, elem_id=elem_id(field))

    def slider(field: str) -> Any:
        o = option(field)
        low, high, step = o.slider
        return gr.Slider(label=o.label, minimum=low, maximum=high, step=step, value=o.setting_default,
                         elem_id=elem_id(field))

    fields: dict[str, Any] = {}
    with gr.Row():
        fields["image"] = gr.Image(label=option("image").label, type="pil", elem_id=elem_id("image"))
        shown = gr.Image(label="Preprocessed map", interactive=False, elem_id=elem_id("preview"))
    with gr.Row():
        fields["model"] = gr.Dropdown(label=option("model").label, choices=[options.NO_MODEL, *model_names()],
                                      value=options.NO_MODEL, elem_id=elem_id("model"))
        refresh = gr.Button("Refresh models", elem_id=elem_id("refresh"))
        for field in ("type", "preprocessor"):
            fields[field] = dropdown(field)
        o = option("resize_mode")
        fields["resize_mode"] = gr.Radio(label=o.label, choices=list(o.choices), value=o.setting_default,
                                         elem_id=elem_id("resize_mode"))
    with gr.Row():
        for field in ("strength", "start", "end"):
            fields[field] = slider(field)
    with gr.Row():
        for field in ("canny_low", "canny_high", "blur_radius"):
            fields[field] = slider(field)
        make_preview = gr.Button("Preview map", elem_id=elem_id("make_preview"))
    refresh.click(fn=lambda: gr.update(choices=[options.NO_MODEL, *model_names()]), inputs=[],
                  outputs=[fields["model"]], show_progress=False)
    make_preview.click(fn=preview, inputs=[fields[f] for f in ("image", "preprocessor", "resize_mode", "canny_low",
                                                               "canny_high", "blur_radius")],
                       outputs=[shown], show_progress=False)
    return {option(field).name: component for field, component in fields.items()}


def build(is_img2img: bool, model_names) -> dict[str, Any]:
    """The accordion's ControlNet block; its fields by option name (the script returns them in table order)."""
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    fields: dict[str, Any] = {}
    with gr.Accordion("ControlNet", open=False, elem_id=f"sd3_controlnet_{tab}"):
        gr.Markdown(NOTE)
        with gr.Tabs():
            for n in range(1, infotext.CONTROLNET_UNITS + 1):
                with gr.Tab(f"Unit {n}"):
                    fields.update(unit(n, tab, model_names))
    return fields
