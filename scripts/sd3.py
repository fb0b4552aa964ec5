"""The SD3 accordion in txt2img / img2img: one AlwaysVisible script; the work is in lib_sd3.

API: ``"alwayson_scripts": {"SD3": {"args": [{"mixdq": "w8a8", "nan_guard": "on"}]}}``.
"""

import gradio as gr
from modules import scripts

from lib_sd3.webui import hooks, script_args, settings, startup

startup.install()


class SD3Script(scripts.Script):
    def title(self) -> str:
        return "SD3"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list:
        tab = "img2img" if is_img2img else "txt2img"
        components = []
        with gr.Accordion("SD3", open=False, elem_id=f"sd3_accordion_{tab}"):
            with gr.Row():
                for arg in script_args.ARGS:
                    component = gr.Dropdown(
                        label=arg.label, choices=list(arg.choices), value=arg.default, elem_id=f"sd3_{arg.name}_{tab}"
                    )
                    components.append(component)
            for build in hooks.UI:
                build(is_img2img)
        self.infotext_fields = []
        return components

    def _args(self, args: tuple) -> dict:
        return script_args.resolve(script_args.parse(args), settings.get)

    def process(self, p, *args) -> None:
        values = self._args(args)
        for hook in hooks.PROCESS:
            hook(p, values)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        values = self._args(args)
        for hook in hooks.BEFORE_EVERY_SAMPLING:
            hook(p, values)

    def postprocess(self, p, processed, *args) -> None:
        values = self._args(args)
        for hook in hooks.POSTPROCESS:
            hook(p, processed, values)
