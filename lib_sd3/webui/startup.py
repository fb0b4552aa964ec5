"""Wire the extension into A1111: feature modules, callbacks, patches. Called by ``scripts/sd3.py``.

A feature module that fails to import (a missing package, an A1111 too old for it) disables that
feature with one console line; the rest of the extension and the WebUI keep working.
"""

from __future__ import annotations

import importlib

from lib_sd3 import get_logger
from lib_sd3.webui import hooks, routes, settings
from lib_sd3.webui.capabilities import a1111_state, loaded_model, model_is_sd3
from lib_sd3.webui.registry import REGISTRY

log = get_logger("startup")

FEATURE_MODULES: tuple[str, ...] = (
    "lib_sd3.webui.iclight",
    "lib_sd3.webui.t5",
    "lib_sd3.webui.samplers",
    "lib_sd3.webui.tokens",
    "lib_sd3.webui.models",  # before mixdq: its load_model_weights patch must wrap ours (restore, then check)
    "lib_sd3.webui.mixdq",
    "lib_sd3.webui.api_args",
    "lib_sd3.webui.slg",
    "lib_sd3.webui.presets",
    "lib_sd3.webui.early",
    "lib_sd3.webui.long_prompts",
    "lib_sd3.webui.lora",
)
"""Modules under lib_sd3.webui, one per feature; each registers its patches and hooks on import."""

_FAILED_FEATURES: dict[str, str] = {}


def _load_features() -> None:
    for name in FEATURE_MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:
            if name not in _FAILED_FEATURES:
                _FAILED_FEATURES[name] = repr(error)
                log.warning("feature %s disabled: %r", name.rsplit(".", 1)[-1], error)


def _run_each(callbacks: list, *args: object, what: str) -> None:
    """Call every feature's hook; one failing feature is logged and must not stop the others."""
    for callback in callbacks:
        try:
            callback(*args)
        except Exception:
            log.exception("%s hook %s failed", what, getattr(callback, "__qualname__", callback))


def on_model_loaded(sd_model: object) -> None:
    """Apply SD3-only patches exactly while an SD3 model is loaded; put A1111 back otherwise."""
    REGISTRY.sync(model_is_sd3(sd_model))
    _run_each(hooks.MODEL_LOADED, sd_model, what="model-loaded")


def on_app_started(_demo: object, app: object) -> None:
    """Mount our routes, then run the features' hooks that need A1111's finished UI / script runners."""
    routes.mount(app)
    _run_each(hooks.APP_STARTED, what="app-started")


def install() -> None:
    """Register callbacks with A1111 (again after a UI reload) and apply global patches."""
    from modules import script_callbacks, shared

    _load_features()
    hooks.STATUS["startup"] = lambda: {"failed_features": dict(_FAILED_FEATURES)}
    script_callbacks.on_ui_settings(lambda: settings.register(shared))
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_script_unloaded(REGISTRY.undo_all)
    _run_each(hooks.INSTALL, script_callbacks, what="install")
    REGISTRY.sync(sd3_loaded=False)  # global patches (the SD3.5 construction among them) before any model loads
    model = loaded_model()  # never shared.sd_model: reading it loads the checkpoint inside script loading
    if model is not None:  # a UI reload: A1111 keeps its model and calls no on_model_loaded for it
        on_model_loaded(model)
    log.info("sd-webui-sd3 ready (A1111 state: %s)", a1111_state())
