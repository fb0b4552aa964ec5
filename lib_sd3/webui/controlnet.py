"""ControlNet for the SD3 family in A1111: the units of a generation, loaded, encoded and attached to sampling.

Per generation (``p.sd3.controlnet``, a :class:`ControlRun`):

- ``process``: the units asked for (the accordion's / API's ``controlnet_<n>_*`` options) are found
  (:mod:`~lib_sd3.webui.controlnet_files`), checked against the loaded base and loaded through the cache (kept across
  generations). A unit that cannot run costs one warning line and an ``off (why)`` infotext entry; the image is
  made without it.
- ``process_before_every_sampling`` (first pass, and again for the hires pass at its size): each control image
  (img2img without one: the init image) is resized, preprocessed, scaled for its type and VAE-encoded by A1111's
  SD3 model.
- Sampling: ``on_cfg_denoiser`` opens :func:`lib_sd3.controlnet.control.controlling` on the MMDiT for the step of
  the call in progress and ``on_cfg_denoised`` closes it, so every model call of A1111's CFG denoiser (cond and
  uncond rows, NaN-guard recomputes) gets the control, while skip-layer guidance's extra pass, which runs after
  ``on_cfg_denoised``, runs without it, as in Stability's reference. With no unit in its window, nothing is touched.
- ``postprocess``: ControlNets the generation did not use are released; all of them when the base model changes.

With MixDQ on, each ControlNet in use is quantized by the same config (:mod:`lib_sd3.controlnet.quantize`) and
goes back to float with the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from lib_sd3 import get_logger
from lib_sd3.controlnet.cache import CacheKey, ControlNetCache, key_of
from lib_sd3.controlnet.control import ControlStack, ControlUnit, controlling
from lib_sd3.controlnet.detect import ControlNetError, ControlType, check_base
from lib_sd3.controlnet.model import ControlNet
from lib_sd3.controlnet.preprocess import ResizeMode, control_latent, control_map
from lib_sd3.controlnet.quantize import follow_base
from lib_sd3.mixdq.config import ConfigError
from lib_sd3.webui import controlnet_extension, controlnet_files, hooks, infotext
from lib_sd3.webui.capabilities import a1111_module, loaded_model, model_is_sd3
from lib_sd3.webui.controlnet_units import UnitRequest
from lib_sd3.webui.generation import GENERATIONS
from lib_sd3.webui.options import NO_MODEL, show

log = get_logger("controlnet")

FEATURE = "ControlNet"
UNITS = infotext.CONTROLNET_UNITS
PARAMS = {"canny": {"low": "canny_low", "high": "canny_high"}, "blur": {"radius": "blur_radius"}}
"""Preprocessor -> its parameters (keyword of :mod:`lib_sd3.controlnet.preprocess`) -> the unit's option field."""
PARAM_WORDS = {"low": "canny low", "high": "canny high", "radius": "blur radius"}


def accordion_requests(values: dict[str, Any]) -> list[UnitRequest]:
    """The units the accordion or the API asked for: those with a model."""
    requests = []
    for n in range(1, UNITS + 1):
        field = lambda name, n=n: values[f"controlnet_{n}_{name}"]  # noqa: E731
        if field("model") == NO_MODEL:
            continue
        preprocessor = field("preprocessor")
        params = {word: field(option) for word, option in PARAMS.get(preprocessor, {}).items()}
        if preprocessor == "canny":
            params = {word: int(value) for word, value in params.items()}
        requests.append(UnitRequest(
            source=f"ControlNet {n}", model=field("model"), image=field("image"), preprocessor=preprocessor,
            params=params, control_type=None if field("type") == "auto" else ControlType[field("type").upper()],
            strength=float(field("strength")), start=float(field("start")), end=float(field("end")),
            resize_mode=ResizeMode(field("resize_mode"))))
    return requests


@dataclasses.dataclass
class LoadedUnit:
    request: UnitRequest
    model: ControlNet
    control_type: ControlType
    key: CacheKey
    label: str  # its infotext entry


@dataclasses.dataclass
class ControlRun:
    """One generation's ControlNet units, and the stack of the sampling pass in progress."""

    units: list[LoadedUnit]
    mmdit: Any
    stack: ControlStack | None = None
    passes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (width, height) of each pass
    calls: int = 0  # model calls that ran with a unit active


def base_of(sd_model: Any) -> tuple[Any, Any] | None:
    """(the SD3 family of the loaded model, its MMDiT), or None when no SD3 model of a known family is loaded."""
    from lib_sd3.webui.models import FAMILY_ATTR

    family = getattr(sd_model, FAMILY_ATTR, None)
    mmdit = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if not model_is_sd3(sd_model) or family is None or mmdit is None:
        return None
    return family, mmdit


def placement(mmdit: Any) -> tuple[torch.dtype, torch.device]:
    """Where a ControlNet for this MMDiT lives: its dtype, and A1111's compute device (under --medvram the MMDiT
    itself may be parked on the CPU between calls)."""
    sample = next(mmdit.parameters())
    dtype = getattr(mmdit, "dtype", None)
    device = getattr(a1111_module("modules.devices"), "device", None)
    return (dtype if isinstance(dtype, torch.dtype) else sample.dtype), (device or sample.device)


def pass_size(p: Any) -> tuple[int, int]:
    """The pixel size of the sampling pass about to run: the hires pass's target during it."""
    if getattr(p, "is_hr_pass", False) and getattr(p, "hr_upscale_to_x", 0):
        return int(p.hr_upscale_to_x), int(p.hr_upscale_to_y)
    return int(p.width), int(p.height)


def vae_encoder(sd_model: Any):
    """A1111's SD3 VAE encode (it applies the SD3 latent shift/scale itself), on its device and dtype."""
    devices = a1111_module("modules.devices")
    device = getattr(devices, "device", None) or next(sd_model.first_stage_model.parameters()).device
    dtype = getattr(devices, "dtype_vae", None) or next(sd_model.first_stage_model.parameters()).dtype

    def encode(x: torch.Tensor) -> torch.Tensor:
        return sd_model.encode_first_stage(x.to(device=device, dtype=dtype)).float()

    return encode


def control_image(request: UnitRequest, p: Any) -> Any:
    """The unit's image, or img2img's init image when it has none (the blur ControlNet's upscaling recipe)."""
    if request.image is not None:
        return request.image
    init = getattr(p, "init_images", None)
    return init[0] if init else None


class ControlNets:
    """The loaded ControlNets, the files they come from, and the control attached during one model call."""

    def __init__(self) -> None:
        self.cache = ControlNetCache()
        self.files = controlnet_files.ControlNetFiles()
        self._attached: contextlib.ExitStack | None = None

    # --- per generation ---------------------------------------------------------------------------

    def requests(self, p: Any, values: dict[str, Any]) -> list[UnitRequest]:
        """The accordion's / API's units, then the ControlNet extension's panel's (read from ``p`` here, whether its
        ``process`` runs before or after ours)."""
        return accordion_requests(values) + controlnet_extension.units(p)

    def process(self, p: Any, values: dict[str, Any]) -> None:
        self.detach()  # a generation interrupted inside a model call left it attached
        generation = GENERATIONS.of(p)
        generation.controlnet = None
        requests = self.requests(p, values)
        if not requests:
            return
        sd_model = getattr(p, "sd_model", None) or loaded_model()
        base = base_of(sd_model)
        if base is None:
            log.warning("SD3 ControlNet units need an SD3 model loaded; %d unit(s) ignored", len(requests))
            return
        family, mmdit = base
        units = [unit for request in requests if (unit := self.load(p, request, family, mmdit)) is not None]
        generation.controlnet = ControlRun(units, mmdit) if units else None

    def load(self, p: Any, request: UnitRequest, family: Any, mmdit: Any) -> LoadedUnit | None:
        label = infotext.controlnet(request.source)
        if request.strength == 0:  # a deliberate choice: recorded, not warned about
            p.extra_generation_params[label] = "off (strength 0)"
            return None
        try:
            if control_image(request, p) is None:
                raise ControlNetError("no control image (give one, or use img2img: its image is the control image)")
            found = None if request.path is not None else self.files.find(request.model)
            path = request.path if found is None else found.path
            dtype, device = placement(mmdit)
            file, model = self.cache.get(path, family.config, family.label, dtype=dtype, device=device)
            follow_base(model, mmdit)  # MixDQ: the base's config on the ControlNet's blocks, or float again
        except (ControlNetError, ConfigError, OSError) as error:
            log.warning("%s off for this image: %s", label, error)
            p.extra_generation_params[label] = f"off ({error})"
            return None
        control_type = request.control_type or file.control_type
        short = controlnet_files.short_hash(found) if found is not None else None
        words = {"model": f"{found.name if found else request.model}" + (f" [{short}]" if short else ""),
                 "type": control_type.label}
        if request.preprocessed_by:
            words["preprocessed by"] = request.preprocessed_by
        words["preprocessor"] = request.preprocessor
        words.update({PARAM_WORDS[k]: show(float(v)) for k, v in request.params.items() if k in PARAM_WORDS})
        words.update({"strength": show(request.strength), "steps": f"{show(request.start)}-{show(request.end)}",
                      "resize": ResizeMode(request.resize_mode).value})
        p.extra_generation_params[label] = infotext.format_controlnet(words)
        return LoadedUnit(request, model, control_type, key_of(path, dtype, device), label)

    def before_sampling(self, p: Any, values: dict[str, Any]) -> None:
        """Each pass: the control latents at its size."""
        run = GENERATIONS.of(p).controlnet
        if run is None:
            return
        width, height = pass_size(p)
        encode = vae_encoder(p.sd_model)
        units = []
        for unit in run.units:
            request = unit.request
            try:
                image = control_map(control_image(request, p), width, height, request.preprocessor,
                                    request.resize_mode, **request.params)
                latent = control_latent(image, unit.control_type, encode, shift_scale_latent=False)
            except (ValueError, RuntimeError, OSError) as error:
                log.warning("%s off for this image: %s", unit.label, error)
                p.extra_generation_params[unit.label] = f"off ({error})"
                continue
            units.append(ControlUnit(unit.model, latent, request.strength, request.start, request.end))
        run.stack = ControlStack(units) if units else None
        run.passes.append((width, height))

    def attach(self, params: Any) -> None:
        """``on_cfg_denoiser``: the control of the step about to run, on the MMDiT until ``on_cfg_denoised``."""
        self.detach()
        generation = GENERATIONS.running()
        run = generation.controlnet if generation is not None else None
        if run is None or run.stack is None:
            return
        attached = contextlib.ExitStack()
        if attached.enter_context(controlling(run.mmdit, run.stack, int(params.sampling_step),
                                              int(params.total_sampling_steps))):
            run.calls += 1
        self._attached = attached

    def detach(self, _params: Any = None) -> None:
        attached, self._attached = self._attached, None
        if attached is not None:
            attached.close()

    def postprocess(self, p: Any, _processed: Any, _values: dict[str, Any]) -> None:
        """Keep what this generation used; release the rest."""
        self.detach()
        run = getattr(getattr(p, "sd3", None), "controlnet", None)
        self.cache.keep_only({unit.key for unit in run.units} if run is not None else set())
        if run is not None:
            run.stack = None

    def model_loaded(self, _sd_model: Any) -> None:
        self.detach()
        self.cache.clear()

    # --- checks, status, routes --------------------------------------------------------------------

    def api_check(self, resolved: dict[str, Any]) -> str | None:
        """An API request's units: the model exists, is an SD3 ControlNet that fits the loaded base, and the
        window and canny thresholds make sense (else HTTP 422 with that one line)."""
        base = base_of(loaded_model())
        for n in range(1, UNITS + 1):
            field = lambda name, n=n: resolved[f"controlnet_{n}_{name}"]  # noqa: E731
            if field("model") == NO_MODEL:
                continue
            key = f"SD3 script arg controlnet_{n}_model"
            if field("start") > field("end"):
                return (f"SD3 script args controlnet_{n}_start={field('start'):g} > controlnet_{n}_end="
                        f"{field('end'):g}; allowed: start <= end")
            if field("preprocessor") == "canny" and field("canny_low") > field("canny_high"):
                return (f"SD3 script args controlnet_{n}_canny_low={field('canny_low'):g} > controlnet_{n}_canny_high="
                        f"{field('canny_high'):g}; allowed: low <= high")
            try:
                found = self.files.find(field("model"))
                if base is not None:
                    family, _ = base
                    check_base(found.file.config, family.config, family.label, found.path.name)
            except ControlNetError as error:
                return f"{key}: {error}"
        return None

    def status(self) -> dict[str, Any]:
        return {"loaded": self.cache.loaded()}

    def listing(self) -> dict[str, Any]:
        """``GET /sd3/controlnet``: the SD3 ControlNets found, what is loaded, and the files not offered."""
        files, skipped = self.files.scan()
        return {"folders": [str(f) for f in self.files.folders()],
                "controlnets": [controlnet_files.describe(f) for f in files],
                "not_offered": skipped, "loaded": self.cache.loaded()}

    def add_routes(self, router: Any) -> None:
        router.add_api_route("/controlnet", self.listing, methods=["GET"])

    def build_ui(self, is_img2img: bool) -> dict[str, Any]:
        from lib_sd3.webui import controlnet_ui

        return controlnet_ui.build(is_img2img, self.files.names)

    def install(self, script_callbacks: Any) -> None:
        """The control is attached around each model call of A1111's CFG denoiser (both states have both)."""
        if hasattr(script_callbacks, "on_cfg_denoiser") and hasattr(script_callbacks, "on_cfg_denoised"):
            script_callbacks.on_cfg_denoiser(self.attach)
            script_callbacks.on_cfg_denoised(self.detach)
        else:
            log.warning("ControlNet disabled: this WebUI has no on_cfg_denoiser / on_cfg_denoised callbacks")


CONTROLNETS = ControlNets()

DECLARED = hooks.Feature(
    FEATURE, install=(CONTROLNETS.install,), model_loaded=(CONTROLNETS.model_loaded,),
    routes=(CONTROLNETS.add_routes,), ui=(CONTROLNETS.build_ui,), api_checks=(CONTROLNETS.api_check,), process=(CONTROLNETS.process,),
    before_every_sampling=(CONTROLNETS.before_sampling,), postprocess=(CONTROLNETS.postprocess,),
    status=CONTROLNETS.status)
