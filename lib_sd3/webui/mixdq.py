"""MixDQ in the WebUI: quantize the loaded SD3 MMDiT in place, and put it back, without a restart.

Where the model lives (both A1111 states): ``shared.sd_model`` is ``SD3Inferencer``, its
``.model`` is sd3-ref's ``BaseModel`` and ``.model.diffusion_model`` the ``MMDiT`` -- with
sd3-ref layer names, which the shipped configs use.

Choosing a config: the SD3 accordion's "MixDQ quantization" dropdown / the ``mixdq`` script arg
(``off``, ``w8a8``, ``w4a8``, ``fp8``, or "setting" = the ``sd3_mixdq`` setting). Which kernel
path runs (compiled, eager, fp8, weight-only: chosen by timing on this device) and why shows in
``GET /sd3/mixdq`` (``kernel``, ``kernel_why``) and in the console. ``POST /sd3/mixdq``
applies a choice at once and makes it the setting, so the next generation agrees with it.
``--sd3-mixdq`` sets the setting for this session; given a YAML path, that config is the one
used whenever MixDQ is on. User configs can also be put in ``models/sd3_mixdq/NAME.yaml`` and
applied by name through the route.

A1111 reloads a checkpoint of the same architecture into the *same* model object
(``sd_models.load_model_weights`` -> ``load_state_dict``), which would silently skip the
quantized layers; a patch restores the float layers first.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lib_sd3 import get_logger
from lib_sd3.mixdq import config as mixdq_config
from lib_sd3.mixdq import model as mixdq_model
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import flags, hooks, infotext, settings
from lib_sd3.webui.capabilities import a1111_module, loaded_model, model_is_sd3, queue_lock

log = get_logger("mixdq")

FEATURE = "MixDQ"
SETTING = "sd3_mixdq"
OFF = "off"
INFOTEXT_NAME = infotext.MIXDQ  # pasting an infotext restores the accordion's choice
INFOTEXT_HASH = infotext.MIXDQ_HASH
USER_DIR = "sd3_mixdq"  # under A1111's models folder: user configs, and the cache of quantized weights


def diffusion_model(sd_model: Any) -> Any | None:
    """The MMDiT of an A1111 SD3 model, or None for anything else."""
    if sd_model is None or not model_is_sd3(sd_model):
        return None
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def user_dir() -> Path | None:
    try:
        from modules import paths_internal

        return Path(paths_internal.models_path) / USER_DIR
    except (ImportError, AttributeError):
        return None


def user_configs() -> dict[str, Path]:
    folder = user_dir()
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml")) if p.stem not in (*mixdq_config.SHIPPED, OFF)}


def choices() -> list[str]:
    return [OFF, *mixdq_config.SHIPPED, *user_configs()]


def _flag_path() -> Path | None:
    value = flags.flag("sd3_mixdq")
    if value and value not in (OFF, *mixdq_config.SHIPPED):
        return Path(value)
    return None


def config_for(choice: str) -> mixdq_config.BitConfig | None:
    """The config a choice means (None for off); a ``--sd3-mixdq PATH`` config replaces the shipped ones."""
    if choice == OFF:
        return None
    flag_path = _flag_path()
    if flag_path is not None and choice in mixdq_config.SHIPPED:
        return mixdq_config.load(flag_path)
    if choice in mixdq_config.SHIPPED:
        return mixdq_config.load(choice)
    path = user_configs().get(choice)
    if path is None:
        raise mixdq_config.ConfigError(f"unknown MixDQ config {choice!r}; available: {choices()}")
    return mixdq_config.load(path)


def _cuda_allocated() -> int | None:
    try:
        import torch

        return torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    except Exception:
        return None


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


_last_report: dict[str, Any] = {}


def mixdq_status(sd_model: Any = None) -> dict[str, Any]:
    """What ``GET /sd3/mixdq`` answers: is it on, with which config, and the memory before/after."""
    sd_model = loaded_model() if sd_model is None else sd_model
    mmdit = diffusion_model(sd_model)
    if mmdit is None:
        return {"active": False, "config": OFF, "sd3_loaded": False, "choices": choices()}
    state = mixdq_model.state(mmdit)
    body: dict[str, Any] = {"active": state is not None, "sd3_loaded": True, "choices": choices(),
                            "config": state.config.name if state else OFF,
                            "mmdit_memory_mb": _mb(mixdq_model.module_bytes(mmdit))}
    if state is not None:
        body.update(state.report())
    if _last_report:
        body["last_change"] = dict(_last_report)
    return body


def apply_choice(choice: str, sd_model: Any = None) -> dict[str, Any]:
    """Bring the loaded SD3 MMDiT to ``choice`` (quantize, restore or switch); a no-op if it is there."""
    sd_model = loaded_model() if sd_model is None else sd_model
    mmdit = diffusion_model(sd_model)
    if mmdit is None:
        raise RuntimeError("MixDQ needs an SD3 model loaded")
    wanted = config_for(choice)
    state = mixdq_model.state(mmdit)
    if _digest(state.config if state else None) == _digest(wanted):
        return mixdq_status(sd_model)  # already there: nothing changes, so the last change stays the one reported
    if wanted is not None:
        mixdq_config.resolve(wanted, mmdit)  # a config that does not fit fails before anything changes
    cuda_before = _cuda_allocated()
    if state is not None:
        mixdq_model.restore(mmdit)
    if wanted is not None:
        for hook in hooks.BEFORE_MMDIT_REWRITE:  # e.g. take A1111's merged LoRA deltas out of the float weights
            hook(mmdit)
        folder = user_dir()
        cache = folder / "cache" if folder is not None else None
        mixdq_model.quantize(mmdit, wanted, cache_dir=cache, spill_dir=cache,
                             model_hash=getattr(sd_model, "sd_model_hash", None) or None)
        _gc_cuda()
    _last_report.clear()
    _last_report.update({"to": choice, "cuda_allocated_before_mb": _mb(cuda_before),
                         "cuda_allocated_after_mb": _mb(_cuda_allocated())})
    return mixdq_status(sd_model)


def _digest(config: mixdq_config.BitConfig | None) -> str | None:
    return None if config is None else config.digest()


def _gc_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# --- script hook: per generation -------------------------------------------------------------

def process(p: Any, values: dict[str, Any]) -> None:
    choice = values.get("mixdq") or OFF
    sd_model = getattr(p, "sd_model", None) or loaded_model()
    if diffusion_model(sd_model) is None:
        return
    try:
        body = apply_choice(choice, sd_model)
    except Exception:
        log.exception("MixDQ %s could not be applied; this image is generated without it", choice)
        raise
    if body["active"]:
        state = mixdq_model.state(diffusion_model(sd_model))
        p.extra_generation_params[INFOTEXT_NAME] = state.config.name
        p.extra_generation_params[INFOTEXT_HASH] = state.config.digest()


def on_model_loaded(sd_model: Any) -> None:
    """Quantize at load when the setting (or ``--sd3-mixdq``) asks for it; a fresh model is always float."""
    if diffusion_model(sd_model) is None:
        return
    choice = settings.get(SETTING)
    if choice and choice != OFF:
        try:
            apply_choice(choice, sd_model)
        except Exception:
            log.exception("MixDQ %s at model load failed; the model stays unquantized", choice)


def _apply_flag_to_setting() -> None:
    """``--sd3-mixdq`` for this session: a shipped name or off becomes the setting; a path means on."""
    value = flags.flag("sd3_mixdq")
    if not value:
        return
    try:
        from modules import shared
    except ImportError:
        return
    shared.opts.data[SETTING] = value if value in (OFF, *mixdq_config.SHIPPED) else mixdq_config.SHIPPED[0]


# --- routes ------------------------------------------------------------------------------------

class MixDQRequest(BaseModel):
    """Body of ``POST /sd3/mixdq``: ``off``, ``w8a8``, ``w4a8``, ``fp8`` or a config in models/sd3_mixdq/."""

    config: str


def add_routes(router: Any) -> None:
    from fastapi import HTTPException

    def get_mixdq() -> dict[str, Any]:
        return mixdq_status()

    def post_mixdq(request: MixDQRequest) -> dict[str, Any]:
        if diffusion_model(loaded_model()) is None:
            raise HTTPException(status_code=409, detail="MixDQ needs an SD3 model loaded")
        if request.config not in choices():
            raise HTTPException(status_code=400, detail=f"unknown MixDQ config {request.config!r}; "
                                                        f"available: {choices()}")
        try:
            with queue_lock():
                body = apply_choice(request.config)
        except (mixdq_config.ConfigError, ValueError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        if request.config in (OFF, *mixdq_config.SHIPPED):
            _set_setting(request.config)
        return body

    router.add_api_route("/mixdq", get_mixdq, methods=["GET"])
    router.add_api_route("/mixdq", post_mixdq, methods=["POST"])


def _set_setting(value: str) -> None:
    try:
        from modules import shared

        shared.opts.data[SETTING] = value
    except ImportError:
        pass


# --- UI ----------------------------------------------------------------------------------------

def state_html() -> str:
    body = mixdq_status()
    if not body.get("sd3_loaded"):
        return "<span>MixDQ: no SD3 model loaded</span>"
    if not body["active"]:
        return f"<span>MixDQ off; MMDiT {body['mmdit_memory_mb']} MB</span>"
    return (f"<span>MixDQ {html.escape(body['config'])}: MMDiT {body['memory_before_mb']} MB &rarr; "
            f"{body['memory_after_mb']} MB ({body['layers']} layers, kernel {html.escape(body['kernel'])})</span>")


def build_ui(is_img2img: bool) -> None:
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    with gr.Row():
        shown = gr.HTML(value=state_html(), elem_id=f"sd3_mixdq_state_{tab}")
        refresh = gr.Button("MixDQ memory", elem_id=f"sd3_mixdq_refresh_{tab}")
    refresh.click(fn=state_html, inputs=[], outputs=[shown])


# --- patch: restore before A1111 reloads weights into the same model ---------------------------

def _detect() -> str | None:
    module = a1111_module("modules.sd_models")
    if module is None or not hasattr(module, "load_model_weights"):
        return "modules.sd_models.load_model_weights not found"
    return None


def _restore_first(original: Any) -> Any:
    def load_model_weights(model, *args, **kwargs):
        mmdit = diffusion_model(model)
        if mmdit is not None and mixdq_model.state(mmdit) is not None:
            log.info("MixDQ: restoring float layers before A1111 loads new weights")
            mixdq_model.restore(mmdit)
        return original(model, *args, **kwargs)

    return load_model_weights


PATCH = Patch.from_swaps("mixdq.load_model_weights", FEATURE, _detect,
                         lambda: [AttributeSwap(a1111_module("modules.sd_models"), "load_model_weights", _restore_first)])

DECLARED = hooks.Feature(
    FEATURE, patches=(PATCH,),
    after=("SD3.5 models",),  # its load_model_weights wraps theirs: restore the float layers, then their checks
    start=(_apply_flag_to_setting,), model_loaded=(on_model_loaded,), routes=(add_routes,), ui=(build_ui,),
    process=(process,), status=mixdq_status)
