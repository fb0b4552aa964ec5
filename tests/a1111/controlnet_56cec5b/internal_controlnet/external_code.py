"""Fake of the ControlNet extension's internal_controlnet/external_code.py (56cec5b)."""

from scripts.enums import ResizeMode

from internal_controlnet.args import ControlNetUnit


def resize_mode_from_value(value):
    return [ResizeMode.RESIZE, ResizeMode.INNER_FIT, ResizeMode.OUTER_FIT][value if value < 3 else 0]


def pixel_perfect_resolution(image, target_H, target_W, resize_mode):
    """Reduced: the estimate the preprocessor then runs at (the real one scales the short side)."""
    return int(min(target_H, target_W))


def find_cn_script(script_runner):
    if script_runner is None:
        return None
    for script in script_runner.alwayson_scripts:
        if script.title().lower() == "controlnet":
            return script
    return None


def to_processing_unit(unit):
    return ControlNetUnit.from_dict(unit) if isinstance(unit, dict) else unit


def get_all_units(script_runner, script_args):
    cn_script = find_cn_script(script_runner)
    if cn_script:
        return [to_processing_unit(a) for a in script_args[cn_script.args_from:cn_script.args_to]
                if isinstance(a, (ControlNetUnit, dict))]
    return []


def get_all_units_in_processing(p):
    return get_all_units(p.scripts, p.script_args)
