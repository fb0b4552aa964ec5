"""The ControlNet extension's panel (Mikubill/sd-webui-controlnet) driving our SD3 ControlNet.

Most A1111 users have that extension, and its panel is where they look. It has no SD3 support: with an SD3
model loaded, ``Script.controlnet_main_entry`` (run from its ``process``) stops at
``assert sd_version != StableDiffusionVersion.UNKNOWN`` in ``check_sd_version_compatible``. Two parts here:

* **It steps aside.** While an SD3 model is loaded, an SD3-only patch replaces ``controlnet_main_entry``
  on the extension's ``Script`` class with one that hooks nothing: it drops what an SD1.5 / SDXL
  generation may have left hooked, and writes only the extension's own infotext entries
  (``ControlNet 0: "Module: canny, Model: sd3.5_large_controlnet_canny [hash], Weight: 1.0, ..."``, one per
  enabled unit, as the extension writes them before its assert). They are harmless: pasting them back
  refills the extension's panel, which then drives our ControlNet again. Its other hooks are then no-ops
  on SD3: ``before_process_batch`` (no noise modifier), ``postprocess_batch`` (no post-processors) and
  ``postprocess`` (its module walk finds none of its hooks on the MMDiT; it returns before touching
  detected maps, since no network was hooked). With SD1.5 / SDXL loaded the patch is not applied, and
  the wrapper passes straight through to the extension if the model changes under it.
* **Its units become our requests.** :func:`units` reads the enabled units of a generation through the
  extension's own code: the units (``external_code.get_all_units_in_processing``, its remote-call
  overrides), the input image (``Script.choose_input_image``: the unit's image, else img2img's init image
  with A1111's resize mode -- the blur ControlNet's upscaling recipe), its preprocessor
  (``Preprocessor.cached_call`` at the unit's resolution and thresholds, pixel-perfect honoured, every one
  of its preprocessors), the model file (``global_state.cn_models``). Weight, guidance start / end and the
  resize mode carry over; the map is made, so our preprocessor is ``none``, except after a depth
  preprocessor (one tagged ``Depth`` or named ``depth*``): those draw near = bright, Stability's depth
  ControlNet reads near = dark, so the request asks for ``invert``.

The extension is found by what it has, at call time, never imported here: its ``Script`` (the always-on
script titled "ControlNet") in A1111's script runners, and the modules it imported itself
(``scripts.global_state``, ``scripts.supported_preprocessor``, ``internal_controlnet.external_code``). Not
installed: nothing happens, quietly. Installed in a shape without these: one console line, nothing patched.
A unit that cannot run on SD3 (no model, a file that is not an SD3 ControlNet, no image, a failing
preprocessor) costs one warning line naming it and is skipped; nothing is raised into the generation.
Not carried over: the extension's control mode, hires-fix option, only-masked cropping for upscale scripts
and multi-input units (one image per unit here).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib_sd3 import get_logger
from lib_sd3.controlnet.detect import ControlNetError, inspect
from lib_sd3.controlnet.preprocess import ResizeMode
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks
from lib_sd3.webui.capabilities import a1111_module, model_is_sd3
from lib_sd3.webui.controlnet_units import UnitRequest

log = get_logger("controlnet")

FEATURE = "ControlNet extension panel"
PATCH_NAME = "controlnet_extension.main_entry"
SCRIPT_TITLE = "controlnet"  # its Script.title(), compared as its external_code.is_cn_script does
RUNNERS = ("scripts_txt2img", "scripts_img2img")
SCRIPT_METHODS = ("controlnet_main_entry", "get_enabled_units", "choose_input_image")
MODULES = {"global_state": "scripts.global_state", "preprocessors": "scripts.supported_preprocessor",
           "external_code": "internal_controlnet.external_code"}
RESIZE_MODES = {"RESIZE": ResizeMode.JUST_RESIZE, "INNER_FIT": ResizeMode.CROP_AND_RESIZE,
                "OUTER_FIT": ResizeMode.RESIZE_AND_FILL}  # its scripts.enums.ResizeMode member -> ours
NO_MODEL = ("", "none")


@dataclasses.dataclass(frozen=True)
class ControlNetExtension:
    """The extension's objects this bridge calls."""

    script_class: type
    global_state: Any  # cn_models: "name [hash]" -> path; cn_models_names: lower-case name -> "name [hash]"
    preprocessors: Any  # its Preprocessor class: get_preprocessor(name) -> object with cached_call, tags
    external_code: Any  # get_all_units_in_processing(p), pixel_perfect_resolution(...)


def is_controlnet_script(script: Any) -> bool:
    try:
        return str(script.title()).lower() == SCRIPT_TITLE
    except Exception:  # another extension's title() failing is not ours to report
        return False


def script_classes(runners: list[Any]) -> list[type]:
    """The ControlNet Script class(es) in these runners, once each (txt2img and img2img share one)."""
    found: list[type] = []
    for runner in runners:
        for script in getattr(runner, "alwayson_scripts", None) or []:
            if is_controlnet_script(script) and type(script) not in found:
                found.append(type(script))
    return found


def missing_parts(script_class: type) -> list[str]:
    """What this bridge needs and the installed extension lacks (another version): empty when it fits."""
    missing = [f"Script.{name}" for name in SCRIPT_METHODS if not callable(getattr(script_class, name, None))]
    return missing + [name for name in MODULES.values() if name not in sys.modules]


def extension_of(runner: Any) -> ControlNetExtension | None:
    """The extension as loaded in this script runner (a generation's ``p.scripts``), or None."""
    classes = script_classes([runner])
    if not classes or missing_parts(classes[0]):
        return None
    state, preprocessors, external = (sys.modules[name] for name in MODULES.values())
    return ControlNetExtension(classes[0], state, getattr(preprocessors, "Preprocessor", None), external)


# --- stepping aside on SD3 ---------------------------------------------------------------------------


def runners() -> list[Any]:
    """The script runners A1111 has built so far (none before its UI or API exists)."""
    scripts = a1111_module("modules.scripts")
    return [runner for runner in (getattr(scripts, name, None) for name in RUNNERS) if runner is not None]


def step_aside(script: Any, p: Any) -> None:
    """The extension's main entry on SD3: hook nothing, undo what an earlier SD1.5 / SDXL generation hooked,
    keep the infotext entries the extension writes (its ``get_enabled_units`` writes them). Its list of enabled
    units is left as it is: its img2img batch tab feeds each unit's next image through that list."""
    latest = getattr(script, "latest_network", None)
    if latest is not None:
        latest.restore()
    script.latest_network = None
    script.noise_modifier = None
    p.controlnet_control_loras = []
    try:
        type(script).get_enabled_units(p)
    except Exception as error:  # its units fail to parse: units() says so, once, for the generation
        log.debug("ControlNet extension infotext not written: %r", error)


def make_main_entry(original: Callable[..., Any]) -> Callable[..., Any]:
    def controlnet_main_entry(self: Any, p: Any, *args: Any, **kwargs: Any) -> Any:
        if not model_is_sd3(getattr(p, "sd_model", None)):
            return original(self, p, *args, **kwargs)
        return step_aside(self, p)

    return controlnet_main_entry


def detect() -> str | None:
    scripts = a1111_module("modules.scripts")
    if scripts is None or not all(hasattr(scripts, name) for name in RUNNERS):
        return "modules.scripts has no scripts_txt2img / scripts_img2img"
    for script_class in script_classes(runners()):
        missing = missing_parts(script_class)
        if missing:
            return f"the installed ControlNet extension has no {', '.join(missing)} (another version?)"
    return None


def swaps() -> list[AttributeSwap]:
    return [AttributeSwap(script_class, "controlnet_main_entry", make_main_entry)
            for script_class in script_classes(runners())]


PATCH = Patch.from_swaps(PATCH_NAME, FEATURE, detect, swaps, sd3_only=True)


# --- its units as our requests -----------------------------------------------------------------------


def resize_mode(mode: Any) -> ResizeMode:
    """The extension's resize mode (its enum, or the value text) as ours."""
    name = getattr(mode, "name", None)
    if name in RESIZE_MODES:
        return RESIZE_MODES[name]
    text = str(getattr(mode, "value", mode)).lower()
    return next((ours for ours in ResizeMode if ours.value.lower() == text), ResizeMode.CROP_AND_RESIZE)


def is_depth(preprocessor: Any) -> bool:
    """A depth preprocessor: tagged ``Depth`` (all of the extension's: midas, leres, leres++, zoe, depth
    anything v1 / v2, hand refiner) or named ``depth*`` (one registered without tags)."""
    tags = {str(tag).lower() for tag in getattr(preprocessor, "tags", None) or ()}
    names = (str(getattr(preprocessor, "name", "")), str(getattr(preprocessor, "label", "")))
    return "depth" in tags or any(name.lower().startswith("depth") for name in names)


def to_image(array: Any) -> Image.Image:
    """A preprocessor's map (H x W, H x W x 1 / 3 / 4, uint8 or float 0..255) as an RGB image."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3:
        array = array[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


class Skipped(Exception):
    """A unit that cannot run on SD3: the message says why, for one warning line."""


def model_path(extension: ControlNetExtension, model: str) -> Path:
    """The file the unit selected, found as the extension finds it: "name [hash]", else by name."""
    if str(model).strip().lower() in NO_MODEL:
        raise Skipped("no ControlNet model selected")
    models = extension.global_state.cn_models
    path = models.get(model)
    if path is None:
        name = getattr(extension.global_state, "cn_models_names", {}).get(str(model).lower())
        path = models.get(name) if name is not None else None
    if path is None:
        raise Skipped(f"model {model!r} not found in the ControlNet extension's list (refresh it?)")
    path = Path(str(path).strip('"'))
    try:
        inspect(path)
    except ControlNetError as error:
        raise Skipped(str(error)) from None
    return path


def input_image(extension: ControlNetExtension, p: Any, unit: Any, index: int) -> tuple[np.ndarray, Any]:
    """The unit's image and resize mode, as the extension chooses them (img2img's init image when none)."""
    try:
        image, mode = extension.script_class.choose_input_image(p, unit, index)
    except Exception as error:
        raise Skipped(f"no input image ({error})") from None
    if isinstance(image, list):
        if len(image) != 1:
            raise Skipped(f"{len(image)} input images; an SD3 ControlNet unit takes one")
        image = image[0]
    image = np.asarray(image)
    return (image[:, :, :3] if image.ndim == 3 and image.shape[2] == 4 else image), mode


def processor_resolution(extension: ControlNetExtension, p: Any, unit: Any, image: np.ndarray, mode: Any) -> int:
    """The unit's resolution, or with pixel-perfect on the extension's estimate for the generation's size."""
    if not getattr(unit, "pixel_perfect", False):
        return unit.processor_res
    target = getattr(extension.script_class, "get_target_dimensions", None)
    height, width = target(p)[:2] if callable(target) else (p.height, p.width)
    return extension.external_code.pixel_perfect_resolution(image, target_H=height, target_W=width,
                                                             resize_mode=mode)


def request_of(extension: ControlNetExtension, p: Any, unit: Any, index: int) -> UnitRequest:
    source = f"ControlNet extension unit {index}"
    path = model_path(extension, unit.model)
    preprocessor = extension.preprocessors.get_preprocessor(unit.module)
    if preprocessor is None:
        raise Skipped(f"preprocessor {unit.module!r} unknown to the ControlNet extension")
    label = str(getattr(preprocessor, "label", unit.module))
    if not getattr(preprocessor, "returns_image", True):
        raise Skipped(f"preprocessor {label} makes no control image (an embedding), nothing an SD3 ControlNet reads")
    image, mode = input_image(extension, p, unit, index)
    try:
        result = preprocessor.cached_call(image, resolution=processor_resolution(extension, p, unit, image, mode),
                                          slider_1=unit.threshold_a, slider_2=unit.threshold_b, low_vram=False,
                                          model=unit.model)
    except Exception as error:
        raise Skipped(f"preprocessor {label} failed: {error!r}") from None
    return UnitRequest(source=source, model=str(unit.model), image=to_image(getattr(result, "value", result)),
                       preprocessor="invert" if is_depth(preprocessor) else "none", strength=float(unit.weight),
                       start=float(unit.guidance_start), end=float(unit.guidance_end), resize_mode=resize_mode(mode),
                       path=path, preprocessed_by=label)


def enabled_units(extension: ControlNetExtension, p: Any) -> list[tuple[int, Any]]:
    """(panel index, unit) for each enabled unit, with the extension's remote-call overrides applied."""
    parse_remote = getattr(extension.script_class, "parse_remote_call", None)
    out = []
    for index, unit in enumerate(extension.external_code.get_all_units_in_processing(p)):
        if parse_remote is not None:
            unit = parse_remote(p, unit, index)
        if getattr(unit, "enabled", False):
            out.append((index, unit))
    return out


def units(p: Any) -> list[UnitRequest]:
    """The ControlNet extension's enabled units of this generation as requests for our ControlNet; [] when the
    extension is absent, the model is not SD3, or no unit is enabled. Never raises."""
    if not model_is_sd3(getattr(p, "sd_model", None)):
        return []
    extension = extension_of(getattr(p, "scripts", None))
    if extension is None:
        return []
    try:
        enabled = enabled_units(extension, p)
    except Exception as error:
        log.warning("ControlNet extension units not read: %r; they are skipped", error)
        return []
    requests = []
    for index, unit in enabled:
        try:
            requests.append(request_of(extension, p, unit, index))
        except Skipped as reason:
            log.warning("ControlNet extension unit %d skipped: %s", index, reason)
        except Exception as error:  # the extension's objects in a shape we did not expect
            log.warning("ControlNet extension unit %d skipped: %r", index, error)
    return requests


def status() -> dict[str, Any]:
    classes = script_classes(runners()) if a1111_module("modules.scripts") is not None else []
    return {"extension_found": bool(classes), "missing": missing_parts(classes[0]) if classes else []}


DECLARED = hooks.Feature(FEATURE, patches=(PATCH,), retarget=(PATCH_NAME,),  # its Script class, new each UI reload
                         status=status)
