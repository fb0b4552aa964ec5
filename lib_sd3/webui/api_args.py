"""Bad SD3 values from the API: HTTP 422 with one line, before any generation starts.

A1111 copies ``alwayson_scripts`` values into the script-args list without looking at them, so a bad
value would only surface inside the script's hooks -- as a traceback per hook, with the image made
anyway. ``Api.init_script_args`` (same signature on dev and the early SD3 branch) runs for txt2img and
img2img after the request is parsed and before the queue lock is taken; wrapping it lets us check there,
through the options table's one check, every way an SD3 value arrives: ``alwayson_scripts`` (any shape)
and ``override_settings`` of our settings. ``Api.apply_infotext`` runs first and turns the request's
``infotext`` field into script args and override settings; an entry naming something not present here
(``SD3 MixDQ: int4``, a custom config of another install) is not the client's mistake: one warning line,
and the setting's own value is used. A1111's API prints no traceback for an ``HTTPException``. A global
patch: the args are ours whatever model is loaded. The UI never sends bad script args (its fields only
offer allowed ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, options, script_args, settings

log = get_logger("api")

FEATURE = "API arg check"
SCRIPT_TITLE = script_args.SCRIPT_TITLE

def requested_entry(request: Any) -> tuple[bool, Any]:
    """(whether the request names our script, its ``alwayson_scripts`` entry)."""
    scripts = getattr(request, "alwayson_scripts", None) or {}
    for name, entry in scripts.items():
        if str(name).lower() == SCRIPT_TITLE.lower():
            return True, entry
    return False, None


def checked_overrides(request: Any) -> dict[str, Any]:
    """Our options' settings among ``override_settings``, each checked as the generation will read it."""
    overrides = getattr(request, "override_settings", None)
    if not isinstance(overrides, dict):
        return {}
    for key, value in overrides.items():
        if key in options.BY_SETTING:
            options.BY_SETTING[key].from_setting(value)  # ScriptArgError: the one line of the 422
    return {key: value for key, value in overrides.items() if key in options.BY_SETTING}


def drop_pasted_overrides_not_here(request: Any, before: set[str]) -> None:
    """After A1111 turned the request's ``infotext`` field into ``override_settings``: an entry naming something
    not present here (``SD3 MixDQ: int4``, a custom config of another install) is not the client's mistake.
    One warning line, and the setting's own value is used. Overrides the client sent itself stay (and are
    checked like everything else)."""
    overrides = getattr(request, "override_settings", None)
    if not isinstance(overrides, dict):
        return
    for key in [k for k in overrides if k not in before and k in options.BY_SETTING]:
        try:
            options.BY_SETTING[key].from_setting(overrides[key])
        except options.ScriptArgError as error:
            log.warning("pasted infotext: %s: not present here; using the setting's value", error)
            del overrides[key]


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
    for check in hooks.API_CHECKS:  # the features' checks against the loaded model (SLG layers within its depth)
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


def make_apply_infotext(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_infotext(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        before = set(getattr(request, "override_settings", None) or ())
        result = original(self, request, *args, **kwargs)
        drop_pasted_overrides_not_here(request, before)
        return result

    return apply_infotext


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

    swaps = [AttributeSwap(api.Api, "init_script_args", make_init_script_args)]
    if hasattr(api.Api, "apply_infotext"):  # the API's "infotext" field (both states; absent in older A1111)
        swaps.append(AttributeSwap(api.Api, "apply_infotext", make_apply_infotext))
    return swaps


PATCH = Patch.from_swaps("api.script_args", FEATURE, _detect, _swaps)
DECLARED = hooks.Feature(FEATURE, patches=(PATCH,),
                         status=lambda: {"script_title": SCRIPT_TITLE, "args": list(options.NAMES)})
