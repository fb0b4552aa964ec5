"""Keep the IC-Light extension (huchenlei/sd-forge-ic-light and its forks) from breaking A1111 generations.

Two things go wrong with IC-Light installed next to an SD3-capable A1111:

* Versions from 2024-05-27 to 2024-06-06 (e.g. ``8c2963e``) do their A1111 work in ``process()`` and
  ``assert self.backend_type == BackendType.Forge`` in ``process_before_every_sampling()``, a hook they
  believed Forge-only. A1111 calls it since its June 2024 dev branch (PR #15984, v1.10; the early SD3
  branch has it too), so every generation logs an ``AssertionError``, IC-Light enabled or not. Their
  ``process_before_every_sampling`` is the Forge path: on A1111 it has nothing to do.
* IC-Light's models are SD1.5 UNets. Enabled with an SD3 or SDXL checkpoint loaded, later versions
  (which apply in ``process_before_every_sampling`` on both backends) patch the MMDiT and the whole
  request fails (``MMDiT.forward() got multiple values for argument 'y'``); older ones fail in VAE
  encoding. The only correct behaviour is to not run IC-Light for that generation, and to say so.

This module recognises IC-Light script objects, tells their shape, and builds reversible swaps of their
hook methods. It is pure: it reads ``p`` and the script objects by duck typing and never imports A1111.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeSwap

log = get_logger("iclight")

TITLE = "iclight"
"""IC-Light's script title ("IC Light" in every version and fork), normalised by :func:`_normalise`."""

SCRIPT_MODULE = "iclightscript"
"""A1111 names a script module after its file (``ic_light_script.py``), normalised."""

PACKAGES = ("libiclight", "lib_iclight")
"""IC-Light's library package: ``libiclight`` (huchenlei) or ``lib_iclight`` (the Haoming02 fork)."""

MODEL_PATCHER_PACKAGE = "lib_modelpatcher"
"""What huchenlei/sd-webui-model-patcher provides; IC-Light's A1111 backend imports it."""

MODEL_PATCHER_URL = "https://github.com/huchenlei/sd-webui-model-patcher"

INFOTEXT_KEY = "IC-Light"
SKIPPED_MARK = "sd3_iclight_skipped"
"""Attribute set on ``p`` once IC-Light is skipped, so every later hook of that generation skips too."""

GENERATION_HOOKS = (
    "before_process", "process", "before_process_batch", "after_extra_networks_activate", "process_batch",
    "process_before_every_sampling", "before_hr", "post_sample", "on_mask_blend", "postprocess_batch",
    "postprocess_batch_list", "postprocess_image", "postprocess_maskoverlay", "postprocess_image_after_composite",
    "postprocess",
)
"""A1111's per-generation script hooks (``ScriptRunner`` calls each with ``p`` first). A skipped IC-Light
must skip all of them: the later hooks read state (``self.args``) that the skipped earlier ones would set."""

_TRUE_STRINGS = frozenset({"true", "1", "yes", "on"})


class Shape(str, enum.Enum):
    """Where an IC-Light version does its A1111 work; the value is what ``/sd3/status`` reports."""

    APPLY_IN_PROCESS = "applies in process()"  # 2024-05-27 .. 2024-06-07: before-every-sampling is Forge's path
    APPLY_BEFORE_SAMPLING = "applies in process_before_every_sampling()"  # 2024-06-10 on, and forks


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _class_defines(cls: type, name: str) -> bool:
    """True when ``cls`` or a base other than A1111's ``Script`` defines ``name`` (A1111's own test)."""
    return any(name in vars(klass) for klass in cls.__mro__ if klass.__name__ != "Script" and klass is not object)


def _module_globals(cls: type) -> Mapping[str, Any]:
    """The globals of the module that defined ``cls``.

    A1111 loads scripts with ``spec_from_file_location`` and never puts them in ``sys.modules``,
    so the module is reached through a method's ``__globals__``.
    """
    for value in vars(cls).values():
        function = getattr(value, "__func__", value)
        found = getattr(function, "__globals__", None)
        if found is not None:
            return found
    return {}


def _from_iclight_package(value: Any) -> bool:
    origin = getattr(value, "__module__", None) or getattr(value, "__name__", None)
    return isinstance(origin, str) and origin.split(".", 1)[0] in PACKAGES


def is_iclight_script(script: Any) -> bool:
    """Is this script object IC-Light's? Its title says "IC Light" and its module is IC-Light's.

    The module is IC-Light's when A1111 named it after ``ic_light_script.py`` or when it uses IC-Light's
    library package; the file path is not looked at (users rename extension folders).
    """
    try:
        title = script.title()
    except Exception:  # a broken title() is some other script's problem, not a match
        return False
    if not isinstance(title, str) or _normalise(title) != TITLE:
        return False
    cls = type(script)
    if _normalise(str(cls.__module__).removesuffix(".py")) == SCRIPT_MODULE:
        return True
    return any(_from_iclight_package(v) for v in _module_globals(cls).values())


def find_scripts(runner: Any) -> list[Any]:
    """IC-Light script objects of one A1111 ``ScriptRunner`` (each object once)."""
    found: dict[int, Any] = {}
    for script in list(getattr(runner, "scripts", None) or []) + list(getattr(runner, "alwayson_scripts", None) or []):
        if id(script) not in found and is_iclight_script(script):
            found[id(script)] = script
    return list(found.values())


def shape_of(script: Any) -> Shape:
    """Old versions define ``process`` (their A1111 path); newer ones apply before every sampling."""
    return Shape.APPLY_IN_PROCESS if _class_defines(type(script), "process") else Shape.APPLY_BEFORE_SAMPLING


def runs_forge_backend(script: Any) -> bool:
    """IC-Light keeps its backend in ``self.backend_type`` (an enum ``A1111`` / ``Forge``)."""
    backend = getattr(script, "backend_type", None)
    return getattr(backend, "name", backend) == "Forge"


def enabled_in(args: Any) -> bool:
    """Is IC-Light enabled in its script args (``p.script_args[args_from:args_to]``)?

    huchenlei's versions take one dict (a ``gr.State`` filled on submit, or the API's
    ``"alwayson_scripts": {"IC Light": {"args": [{"enabled": true, ...}]}}``); the Haoming02 fork takes
    its enable checkbox first. Missing args mean disabled, as in IC-Light's own defaults.
    """
    if not args:
        return False
    first = args[0]
    if isinstance(first, Mapping):
        first = first.get("enabled", False)
    if isinstance(first, str):  # JSON clients send "true"; IC-Light's pydantic model accepts it
        return first.strip().lower() in _TRUE_STRINGS
    return bool(first) if isinstance(first, bool | int | float) else False


def model_family(model: Any) -> str:
    """The family A1111's flags give the model (``set_model_type`` sets is_sd1/is_sd2/is_sdxl/is_ssd/is_sd3).

    Builds before A1111 1.6 lack ``is_sd1``: there a model with none of the other flags is SD1.
    """
    if model is None:
        return "none"
    for flag, family in (("is_sd3", "SD3"), ("is_ssd", "SSD-1B"), ("is_sdxl", "SDXL"), ("is_sd2", "SD2")):
        if getattr(model, flag, False) is True:
            return family
    is_sd1 = getattr(model, "is_sd1", None)
    return "SD1" if is_sd1 is None or is_sd1 is True else "unknown"


def skip_reason(model: Any) -> str | None:
    """Why IC-Light cannot run on ``model`` (None when it is an SD1.5 model, what IC-Light's UNets patch)."""
    family = model_family(model)
    if family == "SD1":
        return None
    if family == "none":
        return "no model is loaded"
    loaded = "of no family A1111 recognises" if family == "unknown" else family
    return f"IC-Light's models are SD1.5 UNets and the loaded model is {loaded}"


def _script_args(p: Any, script: Any) -> Any:
    """What A1111 passes a script: ``p.script_args[script.args_from:script.args_to]``."""
    try:
        return p.script_args[script.args_from:script.args_to]
    except Exception:  # p without script args (a bare processing object): IC-Light counts as disabled
        return ()


def note_skip(p: Any, model: Any, reason: str) -> None:
    """Console warning, infotext entry and UI comment for one skipped generation (once per ``p``).

    The comment is A1111's own notice mechanism (``p.comment``, as for truncated prompts): the UI shows
    it under the images; API clients see the infotext entry in ``info`` and ``infotexts``.
    """
    try:
        setattr(p, SKIPPED_MARK, reason)
    except Exception:
        log.debug("could not mark p as IC-Light-skipped", exc_info=True)
    family = model_family(model)
    log.warning("IC-Light skipped for this generation: %s. Generating without IC-Light; "
                "load an SD1.5 checkpoint to use IC-Light.", reason)
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        params[INFOTEXT_KEY] = f"skipped ({family} model)"
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(f"IC-Light was skipped: {reason}. Load an SD1.5 checkpoint to use IC-Light.")


def wrap_hook(script: Any, hook: str, original: Callable[..., Any], active: Callable[[], bool]) -> Callable[..., Any]:
    """The replacement for one IC-Light hook method.

    ``active`` is read at every call (the ``sd3_iclight_shim`` setting): off, the original runs untouched.
    With IC-Light disabled for this generation the original runs untouched too.
    """
    forge_path = shape_of(script) is Shape.APPLY_IN_PROCESS and hook == "process_before_every_sampling"

    def hook_with_shim(p: Any, *args: Any, **kwargs: Any) -> Any:
        if not active():
            return original(p, *args, **kwargs)
        if forge_path and not runs_forge_backend(script):
            return None  # the A1111 work already happened in process(); this path asserts Forge
        if getattr(p, SKIPPED_MARK, None):
            return None
        if enabled_in(_script_args(p, script)):
            model = getattr(p, "sd_model", None)
            reason = skip_reason(model)
            if reason:
                note_skip(p, model, reason)
                return None
        return original(p, *args, **kwargs)

    hook_with_shim.__name__ = hook
    hook_with_shim.__doc__ = getattr(original, "__doc__", None)
    return hook_with_shim


def hook_swaps(script: Any, active: Callable[[], bool]) -> list[AttributeSwap]:
    """Swaps of every generation hook IC-Light's class defines, on the script object itself.

    Only hooks the class defines: A1111 calls a hook only when the class overrides ``Script``'s, and that
    check reads the class, so wrapping on the instance keeps A1111's choice of which hooks to call. Undo
    deletes the instance attribute and the class's method shows through again, exactly as before.
    """
    return [
        AttributeSwap(script, hook, lambda original, hook=hook: wrap_hook(script, hook, original, active))
        for hook in GENERATION_HOOKS
        if _class_defines(type(script), hook)
    ]


def describe(script: Any) -> dict[str, Any]:
    """One IC-Light script object as ``/sd3/status`` reports it."""
    return {
        "tab": getattr(script, "tabname", None),
        "shape": shape_of(script).value,
        "backend": getattr(getattr(script, "backend_type", None), "name", None),
    }


def packages_in(extension_dirs: Iterable[str]) -> set[str]:
    """Which of IC-Light's and the model patcher's packages the given extension folders hold."""
    wanted = (*PACKAGES, MODEL_PATCHER_PACKAGE)
    return {name for folder in extension_dirs for name in wanted if os.path.isdir(os.path.join(folder, name))}


def model_patcher_available(extension_dirs: Iterable[str], loaded_modules: Iterable[str]) -> bool:
    """True when ``lib_modelpatcher`` is loaded, importable, or in an enabled extension's folder."""
    if MODEL_PATCHER_PACKAGE in set(loaded_modules):
        return True
    try:
        if importlib.util.find_spec(MODEL_PATCHER_PACKAGE) is not None:
            return True
    except (ImportError, ValueError):
        pass
    return MODEL_PATCHER_PACKAGE in packages_in(extension_dirs)


def model_patcher_notice(iclight_installed: bool, model_patcher_found: bool) -> str | None:
    """The start-up line for IC-Light without sd-webui-model-patcher (its A1111 backend cannot import)."""
    if not iclight_installed or model_patcher_found:
        return None
    return (f"IC-Light is installed but cannot work in A1111 without the sd-webui-model-patcher extension: "
            f"install {MODEL_PATCHER_URL} (Extensions > Install from URL) and restart the WebUI.")
