"""Where a file can come from: the endpoints in the order to try them, their URL scheme, the Hub
token and the one endpoint it may go to, offline mode, and what to tell a user who must download by hand."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit

from lib_sd3.fetch.cache import hub_token
from lib_sd3.fetch.known_files import KnownFile

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE_VALUES = {"1", "true", "yes", "on"}


def resolve_url(endpoint: str, repo: str, path: str, revision: str = "main") -> str:
    """The Hub's download URL scheme, which mirrors (HF_ENDPOINT) copy exactly."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"


def parse_endpoints(value: str | Sequence[str] | None) -> list[str]:
    """Comma/space/newline separated endpoints -> list, without trailing slashes or blanks."""
    if value is None:
        return []
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    return [item.strip().rstrip("/") for item in items if item and item.strip()]


def endpoints_in_order(flag: str | None = None, setting: str | None = None,
                       env: Mapping[str, str] | None = None) -> list[str]:
    """Endpoints to try: ``--sd3-mirror``, then the setting, then ``HF_ENDPOINT``, then huggingface.co.

    The user's explicit mirrors come first because users behind a firewall set them exactly because
    huggingface.co times out there; the official Hub stays last as the fallback for everyone else.
    """
    env = os.environ if env is None else env
    ordered = parse_endpoints(flag) + parse_endpoints(setting) + parse_endpoints(env.get("HF_ENDPOINT"))
    ordered.append(DEFAULT_ENDPOINT)
    return list(dict.fromkeys(ordered))


def is_offline(env: Mapping[str, str] | None = None) -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it."""
    env = os.environ if env is None else env
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES


@dataclasses.dataclass(frozen=True)
class HubAuth:
    """A Hub token and the one endpoint it may be sent to."""

    token: str
    endpoint: str

    def headers(self, url: str) -> dict[str, str]:
        ours, there = urlsplit(self.endpoint), urlsplit(url)
        if (ours.scheme, ours.netloc) != (there.scheme, there.netloc):
            return {}
        return {"Authorization": f"Bearer {self.token}"}


def hub_auth(env: Mapping[str, str] | None = None) -> HubAuth | None:
    """As huggingface_hub does: the saved or ``HF_TOKEN`` token, for ``HF_ENDPOINT`` (or huggingface.co)
    only; none when ``HF_HUB_DISABLE_IMPLICIT_TOKEN`` is set."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_DISABLE_IMPLICIT_TOKEN", "").strip().lower() in _TRUE_VALUES:
        return None
    token = hub_token(env)
    endpoint = (parse_endpoints(env.get("HF_ENDPOINT")) or [DEFAULT_ENDPOINT])[0]
    return HubAuth(token, endpoint) if token else None


def manual_instructions(dest: Path, sources: Sequence[KnownFile], endpoints: Sequence[str],
                        revision: str = "main") -> str:
    """What a user with no working connection from this machine must download, and where to put it."""
    lines = [f"To install it by hand, download ONE of these URLs and save it as {dest}:"]
    for endpoint in endpoints:
        for source in sources:
            lines.append(f"  {resolve_url(endpoint, source.repo, source.path, revision)}")
    first = sources[0]
    if first.sha256:
        check = "" if first.confirmed else " (unconfirmed: compare with the X-Linked-Etag the Hub shows)"
        lines.append(f"  expected sha256 {first.sha256}{check}")
    if first.size:
        lines.append(f"  expected size {first.size} bytes")
    lines.append("  check with: sha256sum (Linux), shasum -a 256 (macOS), certutil -hashfile FILE SHA256 (Windows)")
    return "\n".join(lines)
