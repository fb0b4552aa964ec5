"""Fake of the ControlNet extension's scripts/controlnet.py (56cec5b): ``Script`` and its hook order.

``UnetHook`` stands for its scripts/hook.py: ``hook`` marks the UNet (and ``p``), ``restore`` unmarks the UNet, so a
test sees whether anything was hooked, and whether anything was left hooked on the model.
"""

import numpy as np
from internal_controlnet import external_code
from modules import scripts, shared
from scripts.enums import StableDiffusionVersion
from scripts.supported_preprocessor import Preprocessor

from scripts import global_state


class UnetHook:
    def hook(self, model, control_params, process):
        self.model = model
        model.cn_hooked = [unit.model for unit in control_params]
        process.controlnet_hooked = list(model.cn_hooked)  # what this generation hooked, after postprocess too

    def restore(self):
        self.model.cn_hooked = []


def clear_all_secondary_control_models(m):
    m.cn_cleared = getattr(m, "cn_cleared", 0) + 1


class Script(scripts.Script):
    def __init__(self):
        self.latest_network = None
        self.enabled_units = []
        self.detected_map = []
        self.post_processors = []
        self.noise_modifier = None

    def title(self):
        return "ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    @staticmethod
    def get_remote_call(p, attribute, default=None, idx=0, strict=False, force=False):
        if not force and not shared.opts.data.get("control_net_allow_script_control", False):
            return default
        value = getattr(p, attribute, None)
        value = value[idx] if isinstance(value, list) and idx < len(value) else value
        return default if value is None else value

    @staticmethod
    def parse_remote_call(p, unit, idx):
        unit.enabled = Script.get_remote_call(p, "control_net_enabled", unit.enabled, idx, strict=True)
        unit.weight = Script.get_remote_call(p, "control_net_weight", unit.weight, idx)
        return unit

    @staticmethod
    def get_enabled_units(p):
        units = external_code.get_all_units_in_processing(p)
        enabled = [u for i, u in enumerate(units) if Script.parse_remote_call(p, u, i).enabled]
        p.extra_generation_params.update({f"ControlNet {i}": u.serialize() for i, u in enumerate(enabled)})
        return enabled

    @staticmethod
    def choose_input_image(p, unit, idx):
        image = unit.image
        if isinstance(image, dict):
            image = image["image"]
        if image is not None:
            return np.asarray(image), unit.resize_mode
        a1111_image = getattr(p, "init_images", [None])[0]
        if a1111_image is not None:
            return np.asarray(a1111_image), external_code.resize_mode_from_value(p.resize_mode)
        raise ValueError("controlnet is enabled but no input image is given")

    @staticmethod
    def get_target_dimensions(p):
        return p.height, p.width, p.height, p.width

    @staticmethod
    def check_sd_version_compatible(unit):
        sd_version = global_state.get_sd_version()
        assert sd_version != StableDiffusionVersion.UNKNOWN

    def controlnet_main_entry(self, p):
        unet = p.sd_model.model.diffusion_model
        self.noise_modifier = None
        p.controlnet_control_loras = []
        if self.latest_network is not None:
            self.latest_network.restore()
        clear_all_secondary_control_models(unet)
        self.enabled_units = Script.get_enabled_units(p)
        if len(self.enabled_units) == 0:
            self.latest_network = None
            return
        for idx, unit in enumerate(self.enabled_units):
            Script.check_sd_version_compatible(unit)
            preprocessor = Preprocessor.get_preprocessor(unit.module)
            image, _ = Script.choose_input_image(p, unit, idx)
            preprocessor.cached_call(image, resolution=unit.processor_res, slider_1=unit.threshold_a,
                                     slider_2=unit.threshold_b)
        self.latest_network = UnetHook()
        self.latest_network.hook(unet, self.enabled_units, p)

    def controlnet_hack(self, p):
        self.controlnet_main_entry(p)

    def process(self, p, *args, **kwargs):
        self.controlnet_hack(p)

    def before_process_batch(self, p, *args, **kwargs):
        self.noise_modifier = None

    def postprocess(self, p, processed, *args):
        unet = p.sd_model.model.diffusion_model
        clear_all_secondary_control_models(unet)
        self.post_processors = []
        self.enabled_units.clear()
        if self.latest_network is None:
            return
        self.latest_network.restore()
        self.latest_network = None
