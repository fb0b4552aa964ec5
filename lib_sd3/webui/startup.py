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
    "lib_sd3.webui.api_args",  # a global patch on the API: checks every SD3 value before anything runs
    "lib_sd3.webui.iclight",
    "lib_sd3.webui.t5",
    "lib_sd3.webui.samplers",
    "lib_sd3.webui.tokens",
    "lib_sd3.webui.models",  # SD3.5 construction and checked loading: before anything that wraps loading
    "lib_sd3.webui.mixdq",  # after models: its load_model_weights wraps theirs (restore float layers, then check)
    "lib_sd3.webui.slg",
    "lib_sd3.webui.preset_button",
    "lib_sd3.webui.early",
    "lib_sd3.webui.early_long_prompts",
    "lib_sd3.webui.lora",  # after mixdq: its side paths attach to the layers MixDQ just quantized
    "lib_sd3.webui.controlnet",  # after models and mixdq: loads against the family they name, for the MMDiT as run
    # the ControlNet extension's panel: while SD3 is loaded it steps aside, and its units feed our ControlNet
    "lib_sd3.webui.controlnet_extension",
)
"""Modules under lib_sd3.webui, one per feature, each ending with ``DECLARED = Feature(...)``: registered in
this order; a feature's ``after`` is honoured whatever the order here."""

_FAILED_FEATURES: dict[str, str] = {}
_REGISTERED: dict[str, hooks.Feature] = {}


def _declared_features() -> list[hooks.Feature]:
    """Import each feature module and read its declaration; a module that fails costs one console line."""
    features = []
    for name in FEATURE_MODULES:
        try:
            features.append(importlib.import_module(name).DECLARED)
        except Exception as error:
            if name not in _FAILED_FEATURES:
                _FAILED_FEATURES[name] = repr(error)
                log.warning("feature %s disabled: %r", name.rsplit(".", 1)[-1], error)
    return features


def in_order(features: list[hooks.Feature]) -> list[hooks.Feature]:
    """The features in the listed order, except that each comes after those it names in ``after``
    (a name that is not there, a feature that failed to import, is no constraint)."""
    names = {f.name for f in features}
    placed: list[hooks.Feature] = []
    waiting = list(features)
    while waiting:
        ready = next((f for f in waiting if all(a in {p.name for p in placed} or a not in names for a in f.after)),
                     None)
        if ready is None:
            raise ValueError(f"features wait on each other: {[f.name for f in waiting]}")
        placed.append(ready)
        waiting.remove(ready)
    return placed


def register(feature: hooks.Feature) -> None:
    """One feature, once per process (feature modules stay imported over a UI reload): its patches into the
    registry, its hooks into their lists, its one-time start actions."""
    if feature.name in _REGISTERED:
        return
    for patch in feature.patches:
        REGISTRY.add(patch)
    hooks.add(feature)
    _REGISTERED[feature.name] = feature
    _run_each(list(feature.start), what="start")


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
    """Mount our routes, re-apply the patches on objects A1111 rebuilt (its script runners, on a UI reload),
    then run the features' hooks that need A1111's finished UI / script runners."""
    routes.mount(app)
    REGISTRY.reapply(hooks.RETARGET, model_is_sd3(loaded_model()))
    _run_each(hooks.APP_STARTED, what="app-started")


def install() -> None:
    """Register callbacks with A1111 (again after a UI reload) and apply global patches."""
    from modules import script_callbacks, shared

    for feature in in_order(_declared_features()):
        register(feature)
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
