"""HTTP routes under ``/sd3/``, mounted on A1111's FastAPI app from ``on_app_started``."""

from __future__ import annotations

from typing import Any

from lib_sd3.webui import hooks
from lib_sd3.webui.capabilities import capabilities
from lib_sd3.webui.registry import REGISTRY


def feature_states() -> dict[str, dict[str, Any]]:
    """Per feature: its patches' states, summed up, plus whatever the feature itself reports."""
    features: dict[str, dict[str, Any]] = {}
    for name, patch in REGISTRY.status().items():
        entry = features.setdefault(patch["feature"], {"patches": {}})
        entry["patches"][name] = patch["state"]
    for entry in features.values():
        states = set(entry["patches"].values())
        entry["state"] = (
            "active" if states == {"applied"}
            else "disabled" if states & {"unavailable", "failed"}
            else "waiting for an SD3 model"
        )
    for feature, provider in hooks.STATUS.items():
        try:
            features.setdefault(feature, {}).update(provider())
        except Exception as error:  # status must answer even when one feature is broken
            features.setdefault(feature, {})["error"] = repr(error)
    return features


def status() -> dict[str, Any]:
    return {"capabilities": capabilities(), "patches": REGISTRY.status(), "features": feature_states()}


def mount(app: Any) -> None:
    from fastapi import APIRouter

    router = APIRouter(prefix="/sd3", tags=["SD3"])
    router.add_api_route("/status", status, methods=["GET"])
    for add_routes in hooks.ROUTES:
        add_routes(router)
    app.include_router(router)
