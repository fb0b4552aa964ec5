"""Stand-in shaped like IC-Light from 2024-06-10 on (huchenlei/sd-forge-ic-light ff82902), for the real-WebUI suite.

Same class, title and hooks as that version: ``before_process`` reads the arguments and
``process_before_every_sampling`` applies IC-Light on both backends. With IC-Light enabled and an SD3
model loaded the real one fails the whole request (HTTP 500, ``TypeError: MMDiT.forward() got multiple
values for argument 'y'``); this stand-in raises the same kind of error at the same place.
"""

from enum import Enum

from modules import scripts


class BackendType(Enum):
    A1111 = "A1111"
    Forge = "Forge"


def apply_ic_light(p, args):
    model = p.sd_model
    if getattr(model, "is_sd3", False) or getattr(model, "is_sdxl", False):
        raise TypeError("stand-in IC-Light: MMDiT.forward() got multiple values for argument 'y'")
    print("[stand-in IC-Light new] applied")


class ICLightScript(scripts.Script):
    def __init__(self) -> None:
        super().__init__()
        self.apply_ic_light = apply_ic_light
        self.backend_type = BackendType.A1111
        self.args = None

    def title(self):
        return "IC Light"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        return (gr.State({"enabled": False}),)

    def before_process(self, p, *args, **kwargs):
        first = args[0] if args else None
        enabled = bool(first.get("enabled", False)) if isinstance(first, dict) else False
        self.args = first if enabled else None

    def process_before_every_sampling(self, p, *args, **kwargs):
        if self.args is None or not self.args.get("enabled"):
            return
        self.apply_ic_light(p, self.args)

    def postprocess(self, p, processed, *args, **kwargs):
        self.args = None
