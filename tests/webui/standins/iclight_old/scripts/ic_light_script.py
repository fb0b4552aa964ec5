"""Stand-in shaped like IC-Light 2024-05-27..06-06 (huchenlei/sd-forge-ic-light 8c2963e), for the real-WebUI suite.

Same class, title, hooks and assert as that version: it applies in ``process()`` on A1111 and asserts
Forge in ``process_before_every_sampling()`` -- a hook A1111 itself calls since June 2024, so every
generation raises ``AssertionError`` unless sd-webui-sd3's shim is active. Its "apply" step refuses a
model that is not SD1.5, as the real IC-Light (SD1.5 UNets only) cannot work on SD3.
"""

from enum import Enum

from modules import scripts


class BackendType(Enum):
    A1111 = "A1111"
    Forge = "Forge"


def apply_ic_light(p, args):
    model = p.sd_model
    if getattr(model, "is_sd3", False) or getattr(model, "is_sdxl", False):
        raise TypeError("stand-in IC-Light: IC-Light's SD1.5 UNet patch cannot apply to this model")
    print("[stand-in IC-Light old] applied")


def _enabled(args) -> bool:
    first = args[0] if args else None
    return bool(first.get("enabled", False)) if isinstance(first, dict) else False


class ICLightScript(scripts.Script):
    def __init__(self) -> None:
        super().__init__()
        self.apply_ic_light = apply_ic_light
        self.backend_type = BackendType.A1111  # forge_backend is not importable on A1111

    def title(self):
        return "IC Light"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        return (gr.State({"enabled": False}),)

    def process(self, p, *args, **kwargs):
        if self.backend_type != BackendType.A1111:
            return
        if not _enabled(args):
            return
        self.apply_ic_light(p, args[0])

    def process_before_every_sampling(self, p, *args, **kwargs):
        assert self.backend_type == BackendType.Forge
        if not _enabled(args):
            return
        self.apply_ic_light(p, args[0])
