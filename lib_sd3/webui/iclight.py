"""IC-Light shim in A1111: wrap IC-Light's hooks on the script runners; say when its model patcher is missing.

A1111 builds its script runners (``scripts.scripts_txt2img`` / ``scripts_img2img``) and the script objects
in them when it creates the UI (or, with ``--nowebui``, when it creates the API), after our script module
was imported; "Reload UI" throws them away and builds new ones. So the patch is (re)targeted from
``on_app_started``, which A1111 fires after both, on every start and every UI reload. Only IC-Light's
script objects are touched: the runners themselves, and every other script's error reporting, stay A1111's.
"""

from __future__ import annotations

import sys
from typing import Any

from lib_sd3 import get_logger, iclight
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, settings

log = get_logger("iclight")

FEATURE = "IC-Light shim"
PATCH_NAME = "iclight.hooks"
SETTING = "sd3_iclight_shim"
RUNNERS = ("scripts_txt2img", "scripts_img2img")

_notified: set[str] = set()


def _scripts_module() -> Any:
    from modules import scripts

    return scripts


def runners() -> list[Any]:
    """The script runners A1111 has built so far (None before the UI or API exists)."""
    scripts = _scripts_module()
    return [runner for runner in (getattr(scripts, name, None) for name in RUNNERS) if runner is not None]


def iclight_scripts() -> list[Any]:
    return [script for runner in runners() for script in iclight.find_scripts(runner)]


def detect() -> str | None:
    scripts = _scripts_module()
    if not hasattr(scripts, "ScriptRunner") or not all(hasattr(scripts, name) for name in RUNNERS):
        return "modules.scripts has no ScriptRunner / scripts_txt2img / scripts_img2img"
    return None


def shim_active() -> bool:
    return bool(settings.get(SETTING))


def swaps() -> list[AttributeSwap]:
    return [swap for script in iclight_scripts() for swap in iclight.hook_swaps(script, shim_active)]


PATCH = Patch.from_swaps(PATCH_NAME, FEATURE, detect, swaps)


def extension_dirs() -> list[str]:
    """Folders of the enabled extensions (``modules.extensions.active()``)."""
    try:
        from modules import extensions

        return [str(ext.path) for ext in extensions.active()]
    except Exception:  # an A1111 without the extensions module: nothing to look in
        return []


def check_model_patcher() -> None:
    """One start-up line when IC-Light is installed without the model patcher its A1111 backend imports."""
    folders = extension_dirs()
    installed = bool(iclight_scripts()) or bool(set(iclight.PACKAGES) & iclight.packages_in(folders))
    notice = iclight.model_patcher_notice(installed, iclight.model_patcher_available(folders, list(sys.modules)))
    if notice and notice not in _notified:
        _notified.add(notice)
        log.warning(notice)




def status() -> dict[str, Any]:
    folders = extension_dirs()
    return {
        "iclight_scripts": [iclight.describe(s) for s in iclight_scripts()],
        "model_patcher": iclight.model_patcher_available(folders, list(sys.modules)),
        "enabled": shim_active(),
    }


DECLARED = hooks.Feature(FEATURE, patches=(PATCH,), retarget=(PATCH_NAME,),  # the runners' scripts, new each reload
                         app_started=(check_model_patcher,), status=status)
