"""A repo's tokenizer files into the Hub cache, where ``from_pretrained(repo)`` finds them offline."""

from __future__ import annotations

import contextlib
from pathlib import Path

from lib_sd3.fetch.cache import cached_snapshot, hub_cache_dir, local_commit, publish_snapshot, snapshot_folder
from lib_sd3.fetch.endpoints import is_offline, resolve_url
from lib_sd3.fetch.known_files import KnownFile, tokenizer_files
from lib_sd3.fetch.remote import probe
from lib_sd3.fetch.walk import FetchOptions, fetch


def fetch_tokenizer(repo: str, options: FetchOptions, cache: Path | None = None) -> Path:
    """Put ``repo``'s tokenizer files into the Hub cache layout, so that ``from_pretrained(repo)``
    works afterwards with no network (``HF_HUB_OFFLINE=1`` or none at all).

    Files go to ``models--org--name/snapshots/<commit>/`` and ``refs/<revision>`` names the commit
    last, so a half-fetched snapshot is never advertised. Returns the snapshot folder.
    """
    cache = hub_cache_dir() if cache is None else Path(cache)
    files = tokenizer_files(repo)
    existing = cached_snapshot(cache, repo, [f.path for f in files], options.revision)
    if existing.complete and existing.path is not None:
        return existing.path
    offline = options.offline or is_offline()
    commit = local_commit(repo) if offline else _remote_commit(repo, files[0], options)
    snapshot = snapshot_folder(cache, repo, commit)
    for known in files:
        fetch([known], snapshot / known.path, options)
    publish_snapshot(cache, repo, commit, options.revision)
    return snapshot


def _remote_commit(repo: str, first: KnownFile, options: FetchOptions) -> str:
    """The commit the endpoint serves (``X-Repo-Commit``), so our snapshot is named like the Hub's."""
    import requests

    with requests.Session() as session:
        for endpoint in options.endpoints:
            with contextlib.suppress(Exception):  # an endpoint that fails here fails again in fetch()
                remote = probe(session, resolve_url(endpoint, repo, first.path, options.revision), options.timeout,
                               options.hub_auth())
                if remote.commit and len(remote.commit) == 40:
                    return remote.commit
    return local_commit(repo)
