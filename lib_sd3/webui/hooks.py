"""What a feature module adds to A1111, declared as one value; and the extension points the script calls.

Each ``lib_sd3.webui`` feature module ends with ``DECLARED = Feature(...)``: its patches and hooks, nothing
done at import. :mod:`lib_sd3.webui.startup` registers the declarations in one explicit order (``after``
says where order matters) into the lists below, which ``scripts/sd3.py`` and the start-up code call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lib_sd3.patching import Patch

ScriptHook = Callable[[Any, Any], None]  # (p, the generation's resolved options: p.sd3.options)

PROCESS: list[ScriptHook] = []
BEFORE_EVERY_SAMPLING: list[ScriptHook] = []
POSTPROCESS: list[Callable[[Any, Any, Any], None]] = []  # (p, processed, options)
ROUTES: list[Callable[[Any], None]] = []  # (fastapi.APIRouter) -> None
UI: list[Callable[[bool], Any]] = []  # (is_img2img) -> builds gradio blocks in the accordion; returns the fields
# of options whose rows the table leaves to it (``Option.row`` None) by option name, or None
STATUS: dict[str, Callable[[], dict[str, Any]]] = {}  # feature -> extra status for /sd3/status
MODEL_LOADED: list[Callable[[Any], None]] = []  # (sd_model) -> None
BEFORE_MMDIT_REWRITE: list[Callable[[Any], None]] = []  # (mmdit) -> None, before MixDQ re-reads its float weights
BEFORE_LOAD_WEIGHTS: list[Callable[[Any], None]] = []  # (sd_model) -> None, before a checkpoint loads into an SD3 model
APP_STARTED: list[Callable[[], None]] = []  # after A1111 built its UI/API and script runners (each UI reload too)
INSTALL: list[Callable[[Any], None]] = []  # (modules.script_callbacks) -> None; at every install(), since
# A1111 drops every callback on a UI reload while feature modules stay imported
RETARGET: list[str] = []  # patches re-applied at every app start, on the objects A1111 (re)built
API_CHECKS: list[Callable[[dict[str, Any]], str | None]] = []  # resolved options -> None or the 422 line


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature module's patches and hooks. Fields are in the order the hooks run within a generation."""

    name: str
    patches: tuple[Patch, ...] = ()  # applied in this order, after those of the features in ``after``
    after: tuple[str, ...] = ()  # features whose patches and hooks must come first (this one wraps / follows them)
    start: tuple[Callable[[], None], ...] = ()  # once, when start-up registers the feature
    install: tuple[Callable[[Any], None], ...] = ()  # A1111 callbacks of its own, at every install()
    model_loaded: tuple[Callable[[Any], None], ...] = ()
    app_started: tuple[Callable[[], None], ...] = ()
    retarget: tuple[str, ...] = ()  # names among ``patches`` that wrap objects A1111 rebuilds on a UI reload
    routes: tuple[Callable[[Any], None], ...] = ()
    ui: tuple[Callable[[bool], Any], ...] = ()
    api_checks: tuple[Callable[[dict[str, Any]], str | None], ...] = ()
    process: tuple[ScriptHook, ...] = ()
    before_every_sampling: tuple[ScriptHook, ...] = ()
    before_mmdit_rewrite: tuple[Callable[[Any], None], ...] = ()
    before_load_weights: tuple[Callable[[Any], None], ...] = ()
    postprocess: tuple[Callable[[Any, Any, Any], None], ...] = ()
    status: Callable[[], dict[str, Any]] | None = None


def add(feature: Feature) -> None:
    """Put a declared feature's hooks into the lists above (its patches go to the registry: see startup)."""
    PROCESS.extend(feature.process)
    BEFORE_EVERY_SAMPLING.extend(feature.before_every_sampling)
    POSTPROCESS.extend(feature.postprocess)
    ROUTES.extend(feature.routes)
    UI.extend(feature.ui)
    MODEL_LOADED.extend(feature.model_loaded)
    BEFORE_MMDIT_REWRITE.extend(feature.before_mmdit_rewrite)
    BEFORE_LOAD_WEIGHTS.extend(feature.before_load_weights)
    APP_STARTED.extend(feature.app_started)
    INSTALL.extend(feature.install)
    RETARGET.extend(feature.retarget)
    API_CHECKS.extend(feature.api_checks)
    if feature.status is not None:
        STATUS[feature.name] = feature.status
