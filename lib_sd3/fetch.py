"""Resumable, verified downloads from a Hugging Face endpoint or mirror.

Why our own and not ``huggingface_hub``: A1111's venv pins ``huggingface_hub`` 0.36 (its
transformers 4.30 caps it below 1.0), which does not resume a dropped download; no version checks
more than the byte count, tries a list of mirrors, or can be told to stop. A T5-XXL file is 9.8 GB,
so each of those matters (what was measured: docs/t5.md). We use
``huggingface_hub`` only for where its cache lives (:mod:`lib_sd3.t5`), and ``requests`` (in every
A1111 venv) for HTTP.

What one :func:`fetch` does, in order:

1. A file already at ``dest`` with the expected size is used as is (nothing corrupt is ever put
   there: see 6). A file of another size is the user's (a conversion, a copy by hand): it is never
   renamed, truncated or overwritten; the fetch stops and says so. Partial downloads live only
   under our own name, ``dest.part``.
2. ``HF_HUB_OFFLINE=1`` (read here, on every call) / ``FetchOptions.offline``: stop here with
   :class:`FetchOffline` and the manual path.
3. A lock ``dest.lock`` so that two processes never write the same ``.part``: ``fcntl.flock``
   where it exists (released by the kernel if the holder dies, so never stale), else an
   ``O_EXCL`` file whose holder touches it while it works and which is stale after
   :data:`LOCK_STALE_S` without a touch. The second process waits, then finds the file done.
4. Per endpoint, per source: a ``HEAD`` without following redirects reads what the Hub says
   about the file (``X-Linked-Size``, ``X-Linked-Etag`` = sha256 for LFS files, ``ETag`` = git
   blob id for small files, ``X-Repo-Commit``); free disk space is checked against what is left.
5. ``GET`` with ``Range: bytes=<part size>-``, appending to ``.part`` and hashing while
   streaming (the bytes already in ``.part`` are hashed from disk first). A dropped connection or
   timeout retries with exponential back-off, from where it stopped; 429 and 5xx retry too
   (``Retry-After`` honoured, capped); 401/403/404 and HTML error pages move on to the next source.
   An endpoint that cannot be reached (refused, DNS failure, connect timeout) or that accepts and
   never answers (no byte within the read timeout) before it sent anything is given up at once for
   every source: the next endpoint is tried. The whole walk ends when no byte has arrived for
   :data:`GIVE_UP_S`, so a machine with no working endpoint hears so within three minutes.
   The Hub token (``HF_TOKEN`` or the one ``huggingface-cli login`` saved) is sent, as
   huggingface_hub sends it, to the Hub endpoint only (``HF_ENDPOINT`` or huggingface.co), never to
   a mirror and never across a redirect to another host.
6. Only a ``.part`` whose size and digest match is renamed (atomically) to ``dest``. A digest
   mismatch deletes the ``.part`` and tries the next endpoint. Running out of disk keeps the
   ``.part`` for a later resume and stops with :class:`NotEnoughSpace`.

Every error that ends the fetch carries :attr:`FetchError.manual`: the exact URLs, destination
and sha256 for a user who has to download the file by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from lib_sd3 import __version__, get_logger
from lib_sd3.hashing import sha256_file, sha256_update_from_file
from lib_sd3.hub_cache import hub_token
from lib_sd3.known_files import KnownFile

log = get_logger("fetch")

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_BYTES = 256 << 10  # read/write/hash unit; the most a resume re-downloads beyond what was saved
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a stalled stream counts as a dropped connection after this long
GIVE_UP_S = 180.0  # the whole walk over endpoints and sources ends after this long without a byte
MAX_ATTEMPTS = 5  # attempts in a row without a byte of progress, per source and endpoint
BACKOFF_S = 1.0  # first retry delay; doubles each failure in a row
BACKOFF_MAX_S = 30.0
DISK_MARGIN_BYTES = 64 << 20  # keep this much free beyond the file itself
PROGRESS_INTERVAL_S = 0.5
LOCK_WAIT_S = 24 * 3600.0  # another process may be downloading 10 GB on a slow line
LOCK_POLL_S = 0.2
LOCK_STALE_S = 120.0  # O_EXCL fallback only: a lock not touched for this long is abandoned
MAX_REDIRECTS = 5
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------- errors
class FetchError(RuntimeError):
    """A fetch that did not produce a verified file; ``manual`` says how to get it by hand."""

    def __init__(self, message: str, manual: str = "") -> None:
        super().__init__(f"{message}\n{manual}" if manual else message)
        self.reason = message
        self.manual = manual


class FetchOffline(FetchError):
    """Offline mode (``HF_HUB_OFFLINE=1`` / ``--sd3-no-fetch``): the network was not touched."""


class NotEnoughSpace(FetchError):
    """The disk is (or became) too full; a ``.part`` is kept so the next fetch resumes."""


class NotWritable(FetchError):
    """The destination folder cannot be written (read-only file system, permissions)."""


class FetchCancelled(FetchError):
    """Stopped on request; the ``.part`` is kept so the next fetch resumes."""


class LockTimeout(FetchError):
    """Another process held the download's lock for longer than we were willing to wait."""

    def __init__(self, message: str, holder: int | None) -> None:
        super().__init__(message)
        self.holder = holder


class _SourceFailed(Exception):
    """This source on this endpoint will not work (404, HTML page, wrong bytes): try the next one.

    ``bad_bytes``: what is in ``.part`` came from this source and is wrong, so it is deleted rather
    than used to seed the next source.
    """

    def __init__(self, message: str, bad_bytes: bool = False) -> None:
        super().__init__(message)
        self.bad_bytes = bad_bytes


class _Transient(Exception):
    """Worth retrying the same URL (dropped connection, timeout, 429, 5xx).

    ``unreachable``: no connection was made, or it stayed silent (refused, DNS, connect or read
    timeout); before a first byte that condemns the endpoint, not just this attempt.
    """

    def __init__(self, message: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


class _EndpointDown(Exception):
    """This endpoint cannot be reached or never answers: skip its other sources too."""


class _GiveUp(Exception):
    """No byte arrived for :attr:`FetchOptions.give_up_s`: stop walking endpoints."""


# ------------------------------------------------------------------------------------------- endpoints
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
                       env: dict[str, str] | None = None) -> list[str]:
    """Endpoints to try: ``--sd3-mirror``, then the setting, then ``HF_ENDPOINT``, then huggingface.co.

    The user's explicit mirrors come first because users behind a firewall set them exactly because
    huggingface.co times out there; the official Hub stays last as the fallback for everyone else.
    """
    env = os.environ if env is None else env
    ordered = parse_endpoints(flag) + parse_endpoints(setting) + parse_endpoints(env.get("HF_ENDPOINT"))
    ordered.append(DEFAULT_ENDPOINT)
    return list(dict.fromkeys(ordered))


def is_offline(env: dict[str, str] | None = None) -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it."""
    env = os.environ if env is None else env
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES


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


# -------------------------------------------------------------------------------------------- progress
@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report: bytes in ``.part`` so far, of ``total``; rate of this session; ETA."""

    filename: str
    done: int
    total: int | None
    rate: float  # bytes/s since this session's first byte
    eta: float | None  # seconds
    endpoint: str
    state: str = "downloading"  # "connecting": asking ``endpoint`` (``source``) before its first byte
    source: str = ""  # the repo being asked

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None


ProgressCallback = Callable[[Progress], None]


class _Meter:
    """Rate and ETA from bytes received in this session (resumed bytes are not "speed"), and how
    long ago the last byte came (the walk's give-up clock)."""

    def __init__(self, filename: str, callback: ProgressCallback | None, touch: Callable[[], None]) -> None:
        self.filename, self.callback, self.touch = filename, callback, touch
        self.start = time.monotonic()
        self.last_byte = self.start
        self.received = 0
        self.last = 0.0

    def got(self, count: int) -> None:
        self.received += count
        self.last_byte = time.monotonic()

    def idle_s(self) -> float:
        return time.monotonic() - self.last_byte

    def trying(self, done: int, total: int | None, endpoint: str, source: str) -> None:
        """Say which endpoint is asked now, before any byte comes (the UI shows it)."""
        log.info("%s: trying %s (%s)", self.filename, endpoint, source)
        if self.callback is not None:
            self.callback(Progress(self.filename, done, total, 0.0, None, endpoint, "connecting", source))

    def report(self, done: int, total: int | None, endpoint: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        self.touch()
        if self.callback is None:
            return
        rate = self.received / max(now - self.start, 1e-9)
        eta = (total - done) / rate if total is not None and rate > 0 else None
        self.callback(Progress(self.filename, done, total, rate, eta, endpoint))


# ------------------------------------------------------------------------------------------------ lock
class FileLock:
    """A cross-process lock on ``path`` (see the module docstring, step 3)."""

    def __init__(self, path: Path, timeout: float = LOCK_WAIT_S, use_fcntl: bool | None = None,
                 stale_after: float = LOCK_STALE_S, cancel: threading.Event | None = None) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.stale_after = stale_after
        self.cancel = cancel
        if use_fcntl is None:
            try:
                import fcntl  # noqa: F401
                use_fcntl = True
            except ImportError:  # Windows
                use_fcntl = False
        self.use_fcntl = use_fcntl
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The process id the current holder wrote into the lock file, if readable."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> FileLock:
        deadline = time.monotonic() + self.timeout
        while not self._try_acquire():
            if time.monotonic() > deadline:
                raise LockTimeout(f"timed out after {self.timeout:.0f} s waiting for another download", self.holder())
            if self.cancel is not None and self.cancel.wait(LOCK_POLL_S):
                raise FetchCancelled("cancelled while waiting for another download")
            if self.cancel is None:
                time.sleep(LOCK_POLL_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _try_acquire(self) -> bool:
        return self._try_flock() if self.use_fcntl else self._try_exclusive()

    def _try_flock(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # The previous holder may have unlinked the file between our open and our lock: then we hold
        # a lock on a name nobody else can find; start over on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def _try_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return False
            if age > self.stale_after:
                log.warning("removing stale lock %s (untouched for %.0f s)", self.path, age)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            return False
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def touch(self) -> None:
        """Tell other processes the holder is alive (matters for the O_EXCL fallback only)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # unlink while still holding it, so nobody locks a dying name
        os.close(self._fd)
        self._fd = None


# ------------------------------------------------------------------------------------- remote metadata
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
        return min(float(value), BACKOFF_MAX_S) if value is not None else None
    except ValueError:  # an HTTP date: not worth parsing, use our own back-off
        return None


TOKEN_HINT = ("gated or private repo: accept its licence on the Hub, then set HF_TOKEN or run "
              "`huggingface-cli login` (the token is sent to the Hub endpoint only), or download it by hand")


def _check_status(response, what: str) -> None:
    code = response.status_code
    if code in (429,) or code >= 500:
        raise _Transient(f"{what}: HTTP {code}", _retry_after(response))
    if code >= 400:
        hint = {401: f" ({TOKEN_HINT})", 403: f" (forbidden: {TOKEN_HINT}; or blocked)",
                404: " (not found on this endpoint)"}.get(code, "")
        raise _SourceFailed(f"{what}: HTTP {code}{hint}")
    content_type = response.headers.get("Content-Type", "").lower()
    if content_type.startswith("text/html"):
        raise _SourceFailed(f"{what}: the server sent an HTML page instead of the file (a mirror's error page?)")


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


def _network_error(url: str, error: Exception) -> _Transient:
    import requests

    silent = isinstance(error, requests.Timeout) or "Read timed out" in str(error)
    return _Transient(f"{url}: {type(error).__name__}: {error}", unreachable=_unreachable(error) or silent)


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
    if env.get("HF_HUB_DISABLE_IMPLICIT_TOKEN", "").strip().lower() in _OFFLINE_VALUES:
        return None
    token = hub_token(env)
    endpoint = (parse_endpoints(env.get("HF_ENDPOINT")) or [DEFAULT_ENDPOINT])[0]
    return HubAuth(token, endpoint) if token else None


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
            if response.is_redirect or response.status_code in (301, 302, 303, 307, 308):
                sha256 = sha256 or _hex(etag, 64)
                current = urljoin(current, headers["Location"])
                continue
            if response.status_code == 405:  # a mirror without HEAD: learn size and digest from the GET
                return Remote(url, size, sha256, git_sha1, commit)
            _check_status(response, url)
            if sha256 is None:
                sha256 = _hex(etag, 64)
                git_sha1 = None if sha256 else _hex(etag, 40)
            if size is None and headers.get("Content-Length", "").isdigit():
                size = int(headers["Content-Length"])
            return Remote(url, size, sha256, git_sha1, commit)
    except (requests.ConnectionError, requests.Timeout) as error:
        raise _network_error(url, error) from error
    raise _SourceFailed(f"{url}: more than {MAX_REDIRECTS} redirects")


# --------------------------------------------------------------------------------------------- hashing
class _Digests:
    """sha256 always; the git blob sha1 too when that is all the server can verify against."""

    def __init__(self, git_size: int | None) -> None:
        self.sha256 = hashlib.sha256()
        self.git = None
        if git_size is not None:
            self.git = hashlib.sha1(usedforsecurity=False)
            self.git.update(f"blob {git_size}\0".encode())

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)

    def update_from_file(self, path: Path, length: int) -> None:
        sha256_update_from_file(self, path, length)


# -------------------------------------------------------------------------------------------- download
@dataclasses.dataclass(frozen=True)
class FetchResult:
    path: Path
    url: str | None  # None: the file was already there
    sha256: str | None
    verified_by: str  # "table sha256", "server sha256", "git blob id", "size only", "present"
    downloaded: int  # bytes received in this call
    resumed_from: int  # bytes that were already in .part
    commit: str | None = None


def _expected(source: KnownFile, remote: Remote) -> tuple[str | None, str | None, str]:
    """(sha256, git sha1, how) to verify against: a confirmed table digest beats the server's word."""
    if source.sha256 and source.confirmed:
        if remote.sha256 and remote.sha256 != source.sha256:
            log.warning("%s reports sha256 %s for %s, not the known %s; the known one is checked",
                        remote.url, remote.sha256, source.filename, source.sha256)
        return source.sha256, None, "table sha256"
    if remote.sha256:
        return remote.sha256, None, "server sha256"
    if source.sha256:
        return source.sha256, None, "table sha256 (unconfirmed)"
    if remote.git_sha1:
        return None, remote.git_sha1, "git blob id"
    return None, None, "size only"


def _is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _is_not_writable(error: OSError) -> bool:
    return isinstance(error, PermissionError) or error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _write(fh, data: bytes | memoryview) -> None:
    """The one place bytes hit the disk: an unbuffered file, so a full disk is reported by the
    write that hit it, never again by a buffer flushed at close."""
    view = memoryview(data)
    while view:
        written = fh.write(view)
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    """How a :func:`fetch` goes about it: where from, how patient, what to report to.

    ``auth``: the Hub token and the one endpoint it may go to; by default read as huggingface_hub
    reads it (:func:`hub_auth`), ``None`` sends no token. ``give_up_s``: the whole walk over
    endpoints and sources ends after this long without receiving a byte.
    """

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    revision: str = "main"
    offline: bool = False  # on top of HF_HUB_OFFLINE, which fetch() always honours
    progress: ProgressCallback | None = None
    cancel: threading.Event | None = None
    verify_existing: bool = False
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    max_attempts: int = MAX_ATTEMPTS
    backoff: float = BACKOFF_S
    give_up_s: float = GIVE_UP_S
    lock_timeout: float = LOCK_WAIT_S
    use_fcntl: bool | None = None
    session: Any = None
    free_bytes: Callable[[Path], int] = _free_bytes
    auth: HubAuth | None | str = "environment"

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(parse_endpoints(self.endpoints)))

    def hub_auth(self) -> HubAuth | None:
        return hub_auth() if self.auth == "environment" else self.auth  # type: ignore[return-value]


class _Download:
    """One attempt loop for one source on one endpoint, appending to ``part``; owns the digests
    of what is in ``part`` (restarted when a server ignores ``Range``)."""

    def __init__(self, session, source: KnownFile, endpoint: str, part: Path, meter: _Meter,
                 options: FetchOptions, auth: HubAuth | None) -> None:
        self.session, self.source, self.endpoint, self.part = session, source, endpoint, part
        self.meter, self.options, self.auth = meter, options, auth
        self.url = resolve_url(endpoint, source.repo, source.path, options.revision)
        self.digests = _Digests(None)
        self.received_at_start = meter.received

    def _left_s(self) -> float:
        left = self.options.give_up_s - self.meter.idle_s()
        if left <= 0:
            raise _GiveUp(f"no byte received for {self.options.give_up_s:.0f} s")
        return left

    def _timeout(self) -> tuple[float, float]:
        left = self._left_s()
        connect, read = self.options.timeout
        return min(connect, left), min(read, left)

    def _sleep(self, seconds: float) -> None:
        seconds = min(seconds, self._left_s())
        cancel = self.options.cancel
        if cancel is not None:
            if cancel.wait(seconds):
                raise FetchCancelled("cancelled")
        else:
            time.sleep(seconds)

    def _retrying(self, step: Callable[[], object]) -> object:
        """Run ``step`` until it returns; at most ``max_attempts`` attempts in a row without progress."""
        failures, attempts = 0, self.options.max_attempts
        while True:
            before = self.part.stat().st_size if self.part.exists() else 0
            try:
                return step()
            except _Transient as error:
                if error.unreachable and self.meter.received == self.received_at_start:
                    raise _EndpointDown(str(error)) from error
                after = self.part.stat().st_size if self.part.exists() else 0
                failures = 1 if after > before else failures + 1
                if failures >= attempts:
                    raise _SourceFailed(f"{error} (gave up after {failures} attempts)") from error
                delay = error.retry_after if error.retry_after is not None else min(
                    self.options.backoff * 2 ** (failures - 1), BACKOFF_MAX_S)
                log.info("%s; retrying in %.1f s (attempt %d of %d)", error, delay, failures + 1, attempts)
                self._sleep(delay)

    def run(self) -> tuple[Remote, _Digests, str | None, str]:
        """Probe, check space, stream to ``part``: (remote, digests of ``part``, expected digest, how)."""
        have = self.part.stat().st_size if self.part.exists() else 0
        self.meter.trying(have, self.source.size, self.endpoint, self.source.repo)
        remote: Remote = self._retrying(  # type: ignore[assignment]
            lambda: probe(self.session, self.url, self._timeout(), self.auth))
        size = remote.size if remote.size is not None else self.source.size
        if self.source.size is not None and size != self.source.size:
            raise _SourceFailed(f"{self.url}: the server's file is {size} bytes, expected {self.source.size}")
        sha256, git_sha1, how = _expected(self.source, remote)
        if size is not None and have > size:
            log.info("%s is longer than the file (%d > %d bytes): starting over", self.part, have, size)
            self.part.unlink()
            have = 0
        if size is not None:
            need = size - have + DISK_MARGIN_BYTES
            free = self.options.free_bytes(self.part.parent)
            if free < need:
                raise NotEnoughSpace(f"not enough disk space in {self.part.parent}: {need / 1e9:.2f} GB needed "
                                     f"({(size - have) / 1e9:.2f} GB still to download), {free / 1e9:.2f} GB free")
        self.digests = _Digests(size if git_sha1 else None)
        if have:
            log.info("resuming %s from %d bytes", self.source.filename, have)
            self.digests.update_from_file(self.part, have)
        self._retrying(lambda: self._stream(size))
        return remote, self.digests, sha256 or git_sha1, how

    def _stream(self, size: int | None) -> None:
        import requests

        have = self.part.stat().st_size if self.part.exists() else 0
        if size is not None and have == size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        if self.auth is not None:
            headers.update(self.auth.headers(self.url))  # requests drops it on a redirect to another host
        cancel = self.options.cancel
        try:
            with self.session.get(self.url, headers=headers, stream=True, timeout=self._timeout()) as response:
                if response.status_code == 416 and have:
                    raise _SourceFailed(f"{self.url}: server refused to resume at byte {have} (HTTP 416)")
                _check_status(response, self.url)
                if response.status_code == 200 and have:
                    log.info("%s ignores Range: downloading %s from the start", self.endpoint, self.source.filename)
                    have = 0
                    self.digests = _Digests(size if self.digests.git is not None else None)
                elif response.status_code == 206:
                    start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                    if start != str(have):
                        raise _Transient(f"{self.url}: asked for byte {have}, got Content-Range {start!r}")
                with open(self.part, "ab" if have else "wb", buffering=0) as fh:
                    done = have
                    for data in response.iter_content(CHUNK_BYTES):
                        if cancel is not None and cancel.is_set():
                            raise FetchCancelled(f"cancelled at {done} bytes; {self.part} kept for resuming")
                        if size is not None and done + len(data) > size:
                            raise _SourceFailed(f"{self.url}: server sent more than the file's {size} bytes", bad_bytes=True)
                        try:
                            _write(fh, data)
                        except OSError as error:
                            if _is_disk_full(error):
                                raise NotEnoughSpace(f"disk full while writing {self.part} at {done} bytes; "
                                                     "free some space and fetch again: it resumes") from error
                            raise
                        self.digests.update(data)
                        done += len(data)
                        self.meter.got(len(data))
                        self.meter.report(done, size, self.endpoint)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
            raise _network_error(self.url, error) from error
        have = self.part.stat().st_size
        if size is not None and have < size:
            raise _Transient(f"{self.url}: stream ended at {have} of {size} bytes")


def _verify(part: Path, size: int | None, digests: _Digests, expected: str | None, url: str) -> str:
    have = part.stat().st_size
    if size is not None and have != size:
        raise _SourceFailed(f"{url}: got {have} bytes, expected {size}", bad_bytes=True)
    got = digests.git.hexdigest() if digests.git is not None else digests.sha256.hexdigest()
    if expected is not None and got != expected:
        raise _SourceFailed(f"{url}: digest mismatch: got {got}, expected {expected} (wrong bytes; deleted)",
                            bad_bytes=True)
    return digests.sha256.hexdigest()


def _download_verified(download: _Download, part: Path):
    """Download into ``part`` and verify it: (remote, sha256, how verified, size)."""
    remote, digests, expected, how = download.run()
    size = remote.size if remote.size is not None else download.source.size
    return remote, _verify(part, size, digests, expected, download.url), how, size


def fetch(sources: Sequence[KnownFile], dest: Path | str, options: FetchOptions = FetchOptions()) -> FetchResult:
    """Download one file (alternative ``sources`` of the same bytes) to ``dest``, verified.

    Endpoints are tried in order, and for each endpoint the sources in order. Returns where the
    file is and how it was verified; raises :class:`FetchError` (with ``manual``) otherwise.
    """
    if not sources:
        raise ValueError("fetch needs at least one source")
    dest = Path(dest)
    part, lock_path = dest.with_name(dest.name + PART_SUFFIX), dest.with_name(dest.name + LOCK_SUFFIX)
    expected_size = sources[0].size
    endpoints = options.endpoints
    manual = manual_instructions(dest, sources, endpoints or [DEFAULT_ENDPOINT], options.revision)

    present = _present(dest, expected_size, sources[0], options.verify_existing, manual)
    if present is not None:
        return present
    if options.offline or is_offline():
        raise FetchOffline(f"{dest.name} is missing and downloads are off (HF_HUB_OFFLINE / --sd3-no-fetch)", manual)
    if not endpoints:
        raise FetchError(f"{dest.name} is missing and no endpoint is configured", manual)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(lock_path, timeout=options.lock_timeout, use_fcntl=options.use_fcntl,
                      cancel=options.cancel) as lock:
            present = _present(dest, expected_size, sources[0], options.verify_existing, manual)  # done meanwhile?
            if present is not None:
                return present
            return _fetch_locked(sources, dest, part, options, lock, manual)
    except LockTimeout as error:
        held = part.stat().st_size if part.exists() else 0
        who = f"process {error.holder}" if error.holder else "another process"
        raise FetchError(f"{dest.name} is being downloaded by {who} (it has {held / 1e9:.2f} GB in {part} so far) "
                         f"and we waited {options.lock_timeout:.0f} s: wait for that download to finish, or stop "
                         "that process, then fetch again", manual) from None
    except OSError as error:
        if _is_not_writable(error):
            raise NotWritable(f"cannot write to {dest.parent}: {error.strerror or error}", manual) from error
        if _is_disk_full(error):
            raise NotEnoughSpace(f"disk full in {dest.parent}", manual) from error
        raise


def _present(dest: Path, size: int | None, source: KnownFile, verify: bool, manual: str) -> FetchResult | None:
    """The published file at ``dest`` (None: nothing there). A file of another size or digest is
    someone else's: it is left exactly as it is, and the fetch stops."""
    if not dest.exists():
        return None
    have = dest.stat().st_size if dest.is_file() else None
    if size is not None and have != size:
        raise FetchError(f"{dest} is not the published {dest.name} ({have} bytes, expected {size}); it is left "
                         "alone: move or rename it to download the published file", manual)
    if verify and source.sha256:
        got = sha256_file(dest)
        if got != source.sha256:
            raise FetchError(f"{dest} has sha256 {got}, not the published {source.sha256}; it is left alone: move "
                             "or rename it to download the published file", manual)
        return FetchResult(dest, None, got, "table sha256", 0, 0)
    return FetchResult(dest, None, None, "present", 0, 0)


def _fetch_locked(sources: Sequence[KnownFile], dest: Path, part: Path, options: FetchOptions, lock: FileLock,
                  manual: str) -> FetchResult:
    import requests

    session = options.session
    own_session = session is None
    if own_session:
        session = requests.Session()
        session.headers["User-Agent"] = f"sd-webui-sd3/{__version__}"
    auth = options.hub_auth()
    meter = _Meter(dest.name, options.progress, lock.touch)
    failures: list[str] = []
    try:
        for endpoint in options.endpoints:
            try:
                result = _from_endpoint(sources, dest, part, endpoint, options, session, auth, meter, failures, manual)
                if result is not None:
                    return result
            except _EndpointDown as error:
                failures.append(f"{endpoint}: unreachable or silent ({error}); next endpoint")
                log.warning("%s unreachable or silent, trying the next endpoint: %s", endpoint, error)
            except _GiveUp as error:
                failures.append(f"gave up: {error} (every endpoint above failed or stayed silent)")
                break
    finally:
        if own_session:
            session.close()
    tried = "\n".join(f"  - {f}" for f in failures)
    raise FetchError(f"could not download {dest.name} from any endpoint:\n{tried}", manual)


def _from_endpoint(sources, dest: Path, part: Path, endpoint: str, options: FetchOptions, session,
                   auth: HubAuth | None, meter: _Meter, failures: list[str], manual: str) -> FetchResult | None:
    """Each source on one endpoint (None: all failed, recorded in ``failures``); raises
    :class:`_EndpointDown` / :class:`_GiveUp` to move on at once."""
    for source in sources:
        download = _Download(session, source, endpoint, part, meter, options, auth)
        resumed = part.stat().st_size if part.exists() else 0
        try:
            try:
                remote, sha256, how, size = _download_verified(download, part)
            except _SourceFailed as error:
                if not (error.bad_bytes and resumed):
                    raise
                # The bad bytes may be the resumed prefix (a crash, another source), not this source's.
                log.warning("%s; downloading it again from the start", error)
                part.unlink(missing_ok=True)
                resumed = 0
                remote, sha256, how, size = _download_verified(download, part)
        except _SourceFailed as error:
            failures.append(str(error))
            log.warning("%s", error)
            if error.bad_bytes:
                part.unlink(missing_ok=True)  # wrong bytes must not seed the next source
            continue
        except NotEnoughSpace as error:
            raise NotEnoughSpace(error.reason, manual) from None
        except FetchCancelled as error:
            raise FetchCancelled(error.reason, manual) from None
        meter.report(part.stat().st_size, size, endpoint, force=True)
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        log.info("%s verified (%s) from %s", dest, how, endpoint)
        return FetchResult(dest, download.url, sha256, how, meter.received, resumed, remote.commit)
    return None
