"""Where the Hugging Face cache lives, by the same environment variables A1111's transformers reads.

One rule for the doctor (which checks the tokenizers there) and the T5 code (which puts them there):
if the two disagreed, the doctor could call a cache missing that the fetcher had just filled.
Standard library only, so the doctor still runs without a working venv.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def hub_cache_dir(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Path:
    """The folder ``from_pretrained`` caches Hub downloads in.

    TRANSFORMERS_CACHE first: A1111's transformers 4.30 reads it before the hub's own variables.
    """
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    home = Path.home() if home is None else home
    xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else home / ".cache"
    return xdg / "huggingface" / "hub"


def hub_token(env: Mapping[str, str] = os.environ, home: Path | None = None) -> str | None:
    """The Hub token huggingface_hub would send: ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``),
    else the file ``huggingface-cli login`` saved (``HF_TOKEN_PATH``, else ``$HF_HOME/token``)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if env.get(var, "").strip():
            return env[var].strip()
    if env.get("HF_TOKEN_PATH"):
        path = Path(env["HF_TOKEN_PATH"]).expanduser()
    elif env.get("HF_HOME"):
        path = Path(env["HF_HOME"]).expanduser() / "token"
    else:
        home = Path.home() if home is None else home
        xdg = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else home / ".cache"
        path = xdg / "huggingface" / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
