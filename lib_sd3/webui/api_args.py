"""Bad SD3 args from the API: HTTP 422 with one line, before any generation starts.

A1111 copies ``alwayson_scripts`` values into the script-args list without looking at them, so a bad
value would only surface inside the script's hooks -- as a traceback per hook, with the image made
anyway. ``Api.init_script_args`` (same signature on dev and the early SD3 branch) runs for txt2img and
img2img after the request is parsed and before the queue lock is taken; wrapping it lets us check our
args there and answer 422 (A1111's API prints no traceback for an ``HTTPException``). A global patch:
the args are ours whatever model is loaded. The UI never sends bad values (its fields only offer
allowed ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, script_args, settings
from lib_sd3.webui.registry import REGISTRY

log = get_logger("api")

FEATURE = "API arg check"
SCRIPT_TITLE = script_args.SCRIPT_TITLE

CHECKS: list[Callable[[dict[str, Any]], str | None]] = []
"""Further checks of resolved args against the loaded model (e.g. SLG layers within its depth):
each returns None or the one-line problem."""


def requested_args(request: Any) -> Any | None:
    """The ``args`` a request sends to our script, or None when it sends none."""
    scripts = getattr(request, "alwayson_scripts", None) or {}
    for name, entry in scripts.items():
        if str(name).lower() == SCRIPT_TITLE.lower() and isinstance(entry, dict) and "args" in entry:
            return entry["args"]
    return None


def problem(request: Any) -> str | None:
    """The one line that rejects a request's SD3 args, or None when they are fine (or absent)."""
    args = requested_args(request)
    if args is None:
        return None
    try:
        values = script_args.check_request(args)
        resolved = script_args.resolve(values, settings.get)
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
hooks.STATUS[FEATURE] = lambda: {"script_title": SCRIPT_TITLE, "args": list(script_args.NAMES)}
