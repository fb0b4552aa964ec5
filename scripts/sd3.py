"""The SD3 accordion in txt2img / img2img: one AlwaysVisible script; the work is in lib_sd3.

API: ``"alwayson_scripts": {"SD3": {"args": [{"mixdq": "w8a8", "nan_guard": "on", "slg": "on"}]}}``
(names in lib_sd3/webui/options.py; bad values are answered with HTTP 422).
"""

import gradio as gr
from modules import scripts

from lib_sd3.sampling.slg import joint_blocks_of
from lib_sd3.webui import hooks, options, script_args, settings, startup
from lib_sd3.webui.capabilities import loaded_model, model_is_sd3
from lib_sd3.webui.generation import GENERATIONS
from lib_sd3.webui.preset_button import PresetButton

startup.install()


def slg_layer_choices() -> list[str]:
    """The loaded SD3 model's joint blocks (a layer beyond them would turn SLG off); the deepest family's
    before a model is loaded. Read again each time the field is opened: the model may load or change."""
    model = loaded_model()
    try:
        depth = len(joint_blocks_of(getattr(model, "model", None))) if model_is_sd3(model) else 0
    except TypeError:
        depth = 0
    return [str(i) for i in range(depth or options.MAX_LAYERS)]


def arg_component(arg: options.Option, tab: str):
    """Only allowed values can be picked: a dropdown of "default (<setting>)" + the choices, a multiselect of
    block indices (none picked: the default), or a slider starting at the setting's value."""
    current = settings.get(arg.setting_key)
    default = arg.default_label(current)
    elem_id = f"sd3_{arg.name}_{tab}"
    if arg.choices is not None:
        return gr.Dropdown(label=arg.label, choices=[default, *arg.choices], value=default, elem_id=elem_id)
    if arg.slider is not None:
        low, high, step = arg.slider
        return gr.Slider(label=arg.label, minimum=low, maximum=high, step=step, value=arg.from_setting(current),
                         elem_id=elem_id)
    layers = gr.Dropdown(label=arg.label, info=f"none picked: {default}", multiselect=True, value=[],
                         choices=slg_layer_choices(), elem_id=elem_id)
    refresh = lambda: gr.update(choices=slg_layer_choices())  # noqa: E731
    layers.focus(fn=refresh, inputs=[], outputs=[layers], show_progress=False)
    page = _building_blocks()
    if page is not None:  # at each page load too: A1111 loads the model while (or after) it builds the UI
        page.load(fn=refresh, inputs=[], outputs=[layers], show_progress=False)
    return layers


def _building_blocks():
    """The gradio Blocks being built (A1111's txt2img / img2img interface), whose ``load`` runs at page load."""
    try:
        from gradio.context import Context
    except ImportError:
        return None
    root = getattr(Context, "root_block", None)
    return root if hasattr(root, "load") else None


class SD3Script(scripts.Script):
    def title(self) -> str:
        return script_args.SCRIPT_TITLE

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        tab = "img2img" if is_img2img else "txt2img"
        fields = {}
        with gr.Accordion("SD3", open=False, elem_id=f"sd3_accordion_{tab}"):
            for row in options.ROWS:
                with gr.Row():
                    for name in row:
                        fields[name] = arg_component(options.BY_NAME[name], tab)
            self._preset_button(tab).build(fields)
            for build in hooks.UI:
                fields.update(build(is_img2img) or {})
        for name in options.NAMES:  # a feature that builds its own fields is disabled: its options keep their default
            if name not in fields:
                fields[name] = gr.State(value=options.USE_SETTING)
        self.infotext_fields = options.paste_fields(fields)
        self.paste_field_names = list(options.PASTED)
        return [fields[name] for name in options.NAMES]

    def _preset_button(self, tab: str) -> PresetButton:
        if getattr(self, "preset_button", None) is None or self.preset_button.tab != tab:
            self.preset_button = PresetButton(tab)
        return self.preset_button

    def after_component(self, component, **kwargs) -> None:
        self._preset_button("img2img" if self.is_img2img else "txt2img").saw(component, kwargs.get("elem_id"))

    def _start(self, p, args: tuple):
        """Resolve the options once per generation and keep them on ``p.sd3`` (a setting overridden with a
        value not allowed here costs one warning line: the API refused such requests before they ran)."""
        values = script_args.resolve(script_args.parse(args), settings.get, lenient=True)
        return GENERATIONS.start(p, values).options

    def _options(self, p, args: tuple):
        generation = getattr(p, "sd3", None)
        return generation.options if generation is not None and generation.options else self._start(p, args)

    def process(self, p, *args) -> None:
        values = self._start(p, args)
        for hook in hooks.PROCESS:
            hook(p, values)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        values = self._options(p, args)
        for hook in hooks.BEFORE_EVERY_SAMPLING:
            hook(p, values)

    def postprocess(self, p, processed, *args) -> None:
        values = self._options(p, args)
        for hook in hooks.POSTPROCESS:
            hook(p, processed, values)
        GENERATIONS.finish(p)
