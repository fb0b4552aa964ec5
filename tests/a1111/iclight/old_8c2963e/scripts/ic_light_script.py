"""Fake of sd-forge-ic-light 8c2963e ``scripts/ic_light_script.py`` (see ../../README.md)."""

from enum import Enum

from libiclight.args import ICLightArgs
from modules import scripts
from modules.processing import StableDiffusionProcessing, StableDiffusionProcessingTxt2Img


class BackendType(Enum):
    A1111 = "A1111"
    Forge = "Forge"


class ICLightScript(scripts.Script):
    def __init__(self) -> None:
        super().__init__()
        try:
            from libiclight.forge_backend import apply_ic_light

            self.apply_ic_light = apply_ic_light
            self.backend_type = BackendType.Forge
        except ImportError:
            from libiclight.a1111_backend import apply_ic_light

            self.apply_ic_light = apply_ic_light
            self.backend_type = BackendType.A1111

    def title(self):
        return "IC Light"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        import gradio as gr  # the real A1111 needs a component; the unit suite never builds the UI

        return (gr.State({"enabled": False}),)

    def process(self, p: StableDiffusionProcessing, *args, **kwargs):
        if self.backend_type != BackendType.A1111:
            return

        args = ICLightArgs.fetch_from(p)
        if not args.enabled:
            return

        if isinstance(p, StableDiffusionProcessingTxt2Img) and p.enable_hr:
            raise NotImplementedError("Hires-fix is not yet supported in A1111.")

        self.apply_ic_light(p, args)

    def process_before_every_sampling(self, p: StableDiffusionProcessing, *args, **kwargs):
        assert self.backend_type == BackendType.Forge
        args = ICLightArgs.fetch_from(p)
        if not args.enabled:
            return
        self.apply_ic_light(p, args)
