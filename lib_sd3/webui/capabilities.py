"""Which A1111 we are running in, and whether an SD3 model is loaded.

Decided from what the code has, never from version strings: forks and dev builds report
versions that mean nothing, but ``hasattr`` does not lie.
"""

from __future__ import annotations

import contextlib
import importlib
from contextlib import AbstractContextManager
from typing import Any

from lib_sd3 import __version__
from lib_sd3.patching import PatchState
from lib_sd3.sd3_state import STATE_DEV, STATE_EARLY, STATE_NONE, classify

__all__ = ["STATE_DEV", "STATE_EARLY", "STATE_NONE", "a1111_module", "a1111_option", "a1111_state", "capabilities",
           "loaded_model", "model_is_sd3", "queue_lock", "sd3_cond_class"]


def a1111_module(name: str) -> Any | None:
    """A1111's module ``name``, or None where this WebUI lacks it (or it fails to import)."""
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a module that fails on import in a broken install
        return None


def a1111_option(name: str, default: Any = None) -> Any:
    """The current value of an option in A1111's settings (``shared.opts``, ours included); ``default``
    outside the WebUI or where this WebUI has no such option."""
    data = getattr(getattr(a1111_module("modules.shared"), "opts", None), "data", None)
    return data[name] if isinstance(data, dict) and name in data else default


def queue_lock(default: AbstractContextManager[Any] | None = None) -> AbstractContextManager[Any]:
    """A1111's generation queue lock: what changes the model from a route or a background thread takes
    it, so as never to land in the middle of a generation. ``default`` (else no lock) outside the WebUI."""
    lock = getattr(a1111_module("modules.call_queue"), "queue_lock", None)
    return lock if lock is not None else default if default is not None else contextlib.nullcontext()


def sd3_cond_class() -> type | None:
    """A1111's SD3 text-conditioning class, wherever this state keeps it."""
    for name in ("modules.models.sd3.sd3_cond", "modules.models.sd3.sd3_model"):
        module = a1111_module(name)
        if module is not None and hasattr(module, "SD3Cond"):
            return module.SD3Cond
    return None


def a1111_state() -> str:
    """Tell the early SD3 branch from v1.10/dev by what SD3Cond can do."""
    cond = sd3_cond_class()
    return classify(None if cond is None else dir(cond))


def loaded_model() -> Any | None:
    """The model A1111 has loaded, or None; never loads one.

    Reading ``shared.sd_model`` loads the checkpoint when none is loaded yet (both states), which at
    script import would load it before later extensions are even imported. ``sd_models.model_data``
    holds the loaded model without that side effect; an A1111 without it keeps a plain attribute.
    """
    model_data = getattr(a1111_module("modules.sd_models"), "model_data", None)
    if model_data is not None and hasattr(model_data, "sd_model"):
        return model_data.sd_model
    shared = a1111_module("modules.shared")
    return getattr(shared, "sd_model", None) if shared is not None else None


def model_is_sd3(model: Any | None = None) -> bool:
    """True for A1111's SD3 model on both states (``is_sd3`` exists since the SD3 branch)."""
    model = loaded_model() if model is None else model
    return bool(getattr(model, "is_sd3", False))


def capabilities() -> dict[str, Any]:
    """Everything ``GET /sd3/status`` and the doctor report about the running WebUI."""
    from lib_sd3.webui.registry import REGISTRY

    targets = {}
    for patch in REGISTRY:
        if patch.state is PatchState.APPLIED:  # its detector may now find what the patch added (early.dtype)
            targets[patch.name] = True
            continue
        try:
            targets[patch.name] = patch.detect() is None
        except Exception:
            targets[patch.name] = False
    return {
        "extension_version": __version__,
        "a1111_state": a1111_state(),
        "model_is_sd3": model_is_sd3(),
        "patch_targets": targets,
    }
