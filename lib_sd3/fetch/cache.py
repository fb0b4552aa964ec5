"""The Hugging Face cache and home layout, in one place: where the cache is, where a repo's snapshot
is, which snapshot ``refs/<revision>`` names, and where ``huggingface-cli login`` saved the token.

One rule for the doctor (which checks the tokenizers there), the tokenizer fetch (which puts them
there) and the downloader (which sends the token): if they disagreed, the doctor could call a cache
missing that the fetcher had just filled. ``from_pretrained`` offline reads ``refs/<revision>`` and
then ``snapshots/<commit>/<file>``; a snapshot no ref names is invisible to it, so it is invisible
here too. Standard library only, so the doctor still runs without a working venv.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def _xdg_cache(env: Mapping[str, str], home: Path | None) -> Path:
    home = Path.home() if home is None else home
    return Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else home / ".cache"


def hub_cache_dir(env: Mapping[str, str] = os.environ, home: Path | None = None) -> Path:
    """The folder ``from_pretrained`` caches Hub downloads in.

    TRANSFORMERS_CACHE first: A1111's transformers 4.30 reads it before the hub's own variables.
    """
    for var in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return _xdg_cache(env, home) / "huggingface" / "hub"


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
        path = _xdg_cache(env, home) / "huggingface" / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def repo_folder(cache: Path, repo: str) -> Path:
    """The Hub cache's folder for a model repo: ``models--org--name``."""
    return Path(cache) / ("models--" + repo.replace("/", "--"))


@dataclasses.dataclass(frozen=True)
class CachedSnapshot:
    """The snapshot ``refs/<revision>`` names (``path`` None: no ref), and whether it holds every file."""

    path: Path | None
    complete: bool

    @property
    def commit(self) -> str | None:
        return self.path.name if self.path is not None else None


def cached_snapshot(cache: Path, repo: str, files: Iterable[str], revision: str = "main") -> CachedSnapshot:
    """What ``from_pretrained(repo, revision=...)`` finds offline: the snapshot the ref names, and
    whether each of ``files`` (paths inside the repo) is there (``is_file`` follows the blob symlinks)."""
    try:
        commit = (repo_folder(cache, repo) / "refs" / revision).read_text().strip()
    except OSError:
        return CachedSnapshot(None, False)
    if not commit:
        return CachedSnapshot(None, False)
    snapshot = repo_folder(cache, repo) / "snapshots" / commit
    return CachedSnapshot(snapshot, all((snapshot / name).is_file() for name in files))


def snapshot_folder(cache: Path, repo: str, commit: str) -> Path:
    return repo_folder(cache, repo) / "snapshots" / commit


def publish_snapshot(cache: Path, repo: str, commit: str, revision: str = "main") -> None:
    """Point ``refs/<revision>`` at ``commit``, atomically; done last, so a half-filled snapshot is never named."""
    ref = repo_folder(cache, repo) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(ref.name + ".tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def local_commit(repo: str) -> str:
    """A stable commit-shaped name for a snapshot when the server did not send ``X-Repo-Commit``."""
    return hashlib.sha1(f"sd-webui-sd3:{repo}".encode()).hexdigest()
