"""What an endpoint says, and what its answers mean for the walk.

Every ``requests`` exception is turned into one of the walk's outcomes here (:class:`Transient`:
retry; :class:`SourceFailed`: next source), so none escapes :func:`~lib_sd3.fetch.fetch` as the
``OSError`` it subclasses: a redirect loop, a redirect without ``Location`` or to a non-HTTP URL
is one endpoint's fault, and the next endpoint still gets its turn.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import urljoin, urlsplit

from lib_sd3.fetch.endpoints import HubAuth
from lib_sd3.fetch.errors import SourceFailed, Transient

MAX_REDIRECTS = 5
RETRY_AFTER_MAX_S = 30.0
_REDIRECTS = (301, 302, 303, 307, 308)
TOKEN_HINT = ("gated or private repo: accept its licence on the Hub, then set HF_TOKEN or run "
              "`huggingface-cli login` (the token is sent to the Hub endpoint only), or download it by hand")


@dataclasses.dataclass(frozen=True)
class Remote:
    """What the endpoint says about a file before we download it."""

    url: str
    size: int | None
    sha256: str | None  # X-Linked-Etag of an LFS file
    git_sha1: str | None  # ETag of a small (non-LFS) file: the git blob id
    commit: str | None  # X-Repo-Commit


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    value = value[2:] if value.startswith("W/") else value
    return value.strip('"').lower() or None


def _hex(value: str | None, length: int) -> str | None:
    if value and len(value) == length and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _retry_after(response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(float(value), RETRY_AFTER_MAX_S) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, use our own back-off
        return None


def check_status(response, what: str) -> None:
    """Raise what an answer that is not the file means: retry (429, 5xx) or next source (the rest)."""
    code = response.status_code
    if code == 429 or code >= 500:
        raise Transient(f"{what}: HTTP {code}", _retry_after(response))
    if code >= 400:
        hint = {401: f" ({TOKEN_HINT})", 403: f" (forbidden: {TOKEN_HINT}; or blocked)",
                404: " (not found on this endpoint)"}.get(code, "")
        raise SourceFailed(f"{what}: HTTP {code}{hint}")
    if 300 <= code < 400:  # requests follows every redirect it can; this one had no Location
        raise SourceFailed(f"{what}: HTTP {code} redirect without a Location header")
    content_type = response.headers.get("Content-Type", "").lower()
    if content_type.startswith("text/html"):
        raise SourceFailed(f"{what}: the endpoint sent an HTML page instead of the file (a mirror's error page?)")


def redirect_target(current: str, location: str | None, code: int) -> str:
    """Where a redirect points, refused unless it is an http(s) URL."""
    if not location:
        raise SourceFailed(f"{current}: HTTP {code} redirect without a Location header")
    target = urljoin(current, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise SourceFailed(f"{current}: redirected to {target[:200]!r}, not an http(s) URL")
    return target


def _unreachable(error: Exception) -> bool:
    """Refused, DNS failure or connect timeout: no connection was ever made."""
    import requests

    if isinstance(error, requests.ConnectTimeout):
        return True
    try:
        from urllib3.exceptions import NewConnectionError  # NameResolutionError is a subclass (urllib3 2)
    except ImportError:  # pragma: no cover - urllib3 ships with requests
        return False
    seen, stack = set(), [error]
    while stack:
        item = stack.pop()
        if id(item) in seen or item is None:
            continue
        seen.add(id(item))
        if isinstance(item, NewConnectionError):
            return True
        stack.extend([getattr(item, "reason", None), item.__cause__, item.__context__,
                      *(a for a in getattr(item, "args", ()) if isinstance(a, BaseException))])
    return False


def network_error(url: str, error: Exception) -> Exception:
    """A ``requests`` exception as the walk's outcome: connection trouble is retried (or condemns a
    silent endpoint); anything else ``requests`` raises (redirect loop, bad URL) fails this source."""
    import requests

    what = f"{url}: {type(error).__name__}: {error}"
    if isinstance(error, requests.TooManyRedirects):
        return SourceFailed(f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")
    if isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        silent = isinstance(error, requests.Timeout) or "Read timed out" in str(error)
        return Transient(what, unreachable=_unreachable(error) or silent)
    if isinstance(error, (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema)):
        return SourceFailed(f"{url}: led to a URL that is not an http(s) one ({error})")
    return SourceFailed(what)


def probe(session, url: str, timeout: tuple[float, float], auth: HubAuth | None = None) -> Remote:
    """HEAD the resolve URL, following redirects by hand so the Hub's ``X-Linked-*`` headers are seen.

    An ``ETag`` is read as a digest only where the Hub sets it: on the resolve URL's own answer
    (a sha256 for LFS files, the git blob sha1 for small files). A CDN's ETag after a redirect is
    its own business (often an MD5) and is ignored.
    """
    import requests

    size = sha256 = git_sha1 = commit = None
    current = url
    try:
        for hop in range(MAX_REDIRECTS + 1):
            headers = auth.headers(current) if auth is not None else {}
            response = session.head(current, allow_redirects=False, timeout=timeout, headers=headers)
            headers = response.headers
            sha256 = sha256 or _hex(_etag(headers.get("X-Linked-Etag")), 64)
            if size is None and headers.get("X-Linked-Size", "").isdigit():
                size = int(headers["X-Linked-Size"])
            commit = commit or headers.get("X-Repo-Commit")
            etag = _etag(headers.get("ETag")) if hop == 0 else None
            if response.status_code in _REDIRECTS:
                sha256 = sha256 or _hex(etag, 64)
                current = redirect_target(current, headers.get("Location"), response.status_code)
                continue
            if response.status_code == 405:  # a mirror without HEAD: learn size and digest from the GET
                return Remote(url, size, sha256, git_sha1, commit)
            check_status(response, url)
            if sha256 is None:
                sha256 = _hex(etag, 64)
                git_sha1 = None if sha256 else _hex(etag, 40)
            if size is None and headers.get("Content-Length", "").isdigit():
                size = int(headers["Content-Length"])
            return Remote(url, size, sha256, git_sha1, commit)
    except requests.RequestException as error:
        raise network_error(url, error) from error
    raise SourceFailed(f"{url}: more than {MAX_REDIRECTS} redirects (a redirect loop?)")
