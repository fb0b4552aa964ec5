"""Fake of sd-forge-ic-light ff82902 ``scripts/ic_light_script.py`` (see ../../README.md)."""

from enum import Enum

from libiclight.args import ICLightArgs
from modules import scripts
from modules.processing import StableDiffusionProcessing, StableDiffusionProcessingImg2Img


class BackendType(Enum):
    A1111 = "A1111"
    Forge = "Forge"


class ICLightScript(scripts.Script):
    def __init__(self) -> None:
        super().__init__()
        self.args: ICLightArgs = None

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

    def before_process(self, p, *args, **kwargs):
        self.detailed_images: list = []
        args = ICLightArgs.fetch_from(p)
        if not args.enabled:
            self.args = None
            return

        if isinstance(p, StableDiffusionProcessingImg2Img):
            p.init_images[0] = "lightmap"

        self.args = args

    def process_before_every_sampling(self, p: StableDiffusionProcessing, *args, **kwargs):
        if (self.args is None) or (not self.args.enabled):
            return

        self.apply_ic_light(p, self.args)

    def postprocess_image(self, p, pp, *args, **kwargs):
        if (self.args is None) or (not self.args.enabled):
            return
        self.detailed_images.append(pp.image)

    def postprocess(self, p, processed, *args, **kwargs):
        if (self.args is None) or (not self.args.enabled):
            return
        if self.detailed_images:
            processed.images += self.detailed_images
