"""Extension points the SD3 script calls, filled by feature modules at start-up.

Keeping the list here (instead of editing ``scripts/sd3.py`` per feature) lets each feature
live in one module: it registers its patch, its routes, its script hooks and its UI pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ScriptHook = Callable[[Any, dict[str, Any]], None]  # (p, resolved script args)

PROCESS: list[ScriptHook] = []
BEFORE_EVERY_SAMPLING: list[ScriptHook] = []
POSTPROCESS: list[Callable[[Any, Any, dict[str, Any]], None]] = []  # (p, processed, args)
ROUTES: list[Callable[[Any], None]] = []  # (fastapi.APIRouter) -> None
UI: list[Callable[[bool], None]] = []  # (is_img2img) -> None, builds gradio blocks in the accordion
STATUS: dict[str, Callable[[], dict[str, Any]]] = {}  # feature -> extra status for /sd3/status
MODEL_LOADED: list[Callable[[Any], None]] = []  # (sd_model) -> None
BEFORE_MMDIT_REWRITE: list[Callable[[Any], None]] = []  # (mmdit) -> None, before MixDQ re-reads its float weights
BEFORE_LOAD_WEIGHTS: list[Callable[[Any], None]] = []  # (sd_model) -> None, before a checkpoint loads into an SD3 model
APP_STARTED: list[Callable[[], None]] = []  # after A1111 built its UI/API and script runners (each UI reload too)
INSTALL: list[Callable[[Any], None]] = []  # (modules.script_callbacks) -> None; at every install(), since
# A1111 drops every callback on a UI reload while feature modules stay imported
