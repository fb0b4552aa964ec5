"""Bad SD3 values from the API: HTTP 422 with one line, before any generation starts.

A1111 copies ``alwayson_scripts`` values into the script-args list without looking at them, so a bad
value would only surface inside the script's hooks -- as a traceback per hook, with the image made
anyway. ``Api.init_script_args`` (same signature on dev and the early SD3 branch) runs for txt2img and
img2img after the request is parsed (and its ``infotext`` field applied) and before the queue lock is
taken; wrapping it lets us check there every way an SD3 value arrives, through the options table's one
check: ``alwayson_scripts`` (any shape), ``override_settings`` of our settings, and the settings a pasted
``infotext`` field turned into overrides. A pasted infotext naming something not present here (a custom
MixDQ config, say) is not the client's mistake: one warning line, and the setting's own value is used.
A1111's API prints no traceback for an ``HTTPException``. A global patch: the args are ours whatever
model is loaded. The UI never sends bad script args (its fields only offer allowed ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, options, script_args, settings
from lib_sd3.webui.registry import REGISTRY

log = get_logger("api")

FEATURE = "API arg check"
SCRIPT_TITLE = script_args.SCRIPT_TITLE

CHECKS: list[Callable[[dict[str, Any]], str | None]] = []
"""Further checks of resolved args against the loaded model (e.g. SLG layers within its depth):
each returns None or the one-line problem."""


def requested_entry(request: Any) -> tuple[bool, Any]:
    """(whether the request names our script, its ``alwayson_scripts`` entry)."""
    scripts = getattr(request, "alwayson_scripts", None) or {}
    for name, entry in scripts.items():
        if str(name).lower() == SCRIPT_TITLE.lower():
            return True, entry
    return False, None


def pasted_params(request: Any) -> dict[str, Any]:
    """The request's ``infotext`` field parsed as A1111 parses it (empty without one)."""
    text = getattr(request, "infotext", None)
    if not text:
        return {}
    from lib_sd3.webui.capabilities import a1111_module

    parse = getattr(a1111_module("modules.infotext_utils") or a1111_module("modules.generation_parameters_copypaste"),
                    "parse_generation_parameters", None)
    return parse(text) if parse is not None else {}


def checked_overrides(request: Any) -> dict[str, Any]:
    """Our options' settings among ``override_settings``, each read as the generation will read it.

    A bad value the client sent raises ScriptArgError; one that came from the pasted ``infotext`` is dropped
    from the request with a warning line, so the setting's own value is used.
    """
    overrides = getattr(request, "override_settings", None)
    if not isinstance(overrides, dict):
        return {}
    params = pasted_params(request)
    checked = {}
    for key, value in list(overrides.items()):
        option = options.BY_SETTING.get(key)
        if option is None:
            continue
        try:
            option.from_setting(value)
        except options.ScriptArgError as error:
            label = options.setting_infotext(option)
            if label is None or label not in params or str(params[label]) != str(value):
                raise
            log.warning("pasted infotext: %s: not present here; using the setting's value", error)
            del overrides[key]
            continue
        checked[key] = value
    return checked


def problem(request: Any) -> str | None:
    """The one line that rejects a request's SD3 values, or None when they are fine (or absent)."""
    named, entry = requested_entry(request)
    try:
        overrides = checked_overrides(request)
        if not named and not overrides:
            return None
        values = script_args.check_request(entry) if named else script_args.parse(())
        # stored settings as the generation reads them (a bad one: a warning there, as in the UI)
        resolved = script_args.resolve(values, lambda key: overrides[key] if key in overrides else settings.get(key),
                                       lenient=True)
    except script_args.ScriptArgError as error:
        return str(error)
    for check in CHECKS:
        found = check(resolved)
        if found:
            return found
    return None


def make_init_script_args(original: Callable[..., Any]) -> Callable[..., Any]:
    def init_script_args(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        found = problem(request)
        if found:
            from fastapi import HTTPException

            log.warning("API request refused (HTTP 422): %s", found)
            raise HTTPException(status_code=422, detail=found)
        return original(self, request, *args, **kwargs)

    return init_script_args


def _detect() -> str | None:
    from lib_sd3.webui.capabilities import a1111_module

    api = a1111_module("modules.api.api")
    if api is None:
        return "modules.api.api not importable"
    if not hasattr(getattr(api, "Api", None), "init_script_args"):
        return "modules.api.api.Api.init_script_args not found"
    return None


def _swaps() -> list[AttributeSwap]:
    from modules.api import api

    return [AttributeSwap(api.Api, "init_script_args", make_init_script_args)]


PATCH = Patch.from_swaps("api.script_args", FEATURE, _detect, _swaps)
REGISTRY.add(PATCH)
hooks.STATUS[FEATURE] = lambda: {"script_title": SCRIPT_TITLE, "args": list(options.NAMES)}
