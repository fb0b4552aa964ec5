"""Resumable, verified downloads from a Hugging Face endpoint or mirror.

Why our own and not ``huggingface_hub``: A1111's venv pins ``huggingface_hub`` 0.36 (its
transformers 4.30 caps it below 1.0). Measured against a local mirror that drops the connection
at 50 %, 0.36 raised ``ChunkedEncodingError``, left a 0-byte ``.incomplete`` and restarted from
zero; 2.x resumes, but neither checks more than the byte count, neither tries a list of mirrors,
and neither can be told to stop. A T5-XXL file is 9.8 GB, so each of those matters. We use
``huggingface_hub`` only for where its cache lives (:mod:`lib_sd3.t5`), and ``requests`` (in every
A1111 venv) for HTTP.

What one :func:`fetch` does, in order:

1. A file already at ``dest`` with the expected size is used as is (nothing corrupt is ever put
   there: see 6). A shorter one (a crashed copy by hand, an old non-atomic download) becomes the
   ``.part`` and is resumed; its bytes are checked by the digest like any other.
2. ``HF_HUB_OFFLINE=1`` / ``offline=True``: stop here with :class:`FetchOffline` and the manual path.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote, urljoin

from lib_sd3 import __version__, get_logger
from lib_sd3.known_files import KnownFile

log = get_logger("fetch")

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_BYTES = 256 << 10  # read/write/hash unit; the most a resume re-downloads beyond what was saved
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a stalled stream counts as a dropped connection after this long
MAX_ATTEMPTS = 5  # failures in a row without a byte of progress, per source and endpoint
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


class _SourceFailed(Exception):
    """This source on this endpoint will not work (404, HTML page, wrong bytes): try the next one.

    ``bad_bytes``: what is in ``.part`` came from this source and is wrong, so it is deleted rather
    than used to seed the next source.
    """

    def __init__(self, message: str, bad_bytes: bool = False) -> None:
        super().__init__(message)
        self.bad_bytes = bad_bytes


class _Transient(Exception):
    """Worth retrying the same URL (dropped connection, timeout, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


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

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None


ProgressCallback = Callable[[Progress], None]


class _Meter:
    """Rate and ETA from bytes received in this session (resumed bytes are not "speed")."""

    def __init__(self, filename: str, callback: ProgressCallback | None, touch: Callable[[], None]) -> None:
        self.filename, self.callback, self.touch = filename, callback, touch
        self.start = time.monotonic()
        self.received = 0
        self.last = 0.0

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

    def __enter__(self) -> FileLock:
        deadline = time.monotonic() + self.timeout
        while not self._try_acquire():
            if time.monotonic() > deadline:
                raise FetchError(f"timed out after {self.timeout:.0f} s waiting for another download of {self.path}")
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


def _check_status(response, what: str) -> None:
    code = response.status_code
    if code in (429,) or code >= 500:
        raise _Transient(f"{what}: HTTP {code}", _retry_after(response))
    if code >= 400:
        hint = {401: " (gated or private repo: needs a token)", 403: " (forbidden: gated repo or blocked)",
                404: " (not found on this endpoint)"}.get(code, "")
        raise _SourceFailed(f"{what}: HTTP {code}{hint}")
    content_type = response.headers.get("Content-Type", "").lower()
    if content_type.startswith("text/html"):
        raise _SourceFailed(f"{what}: the server sent an HTML page instead of the file (a mirror's error page?)")


def probe(session, url: str, timeout: tuple[float, float]) -> Remote:
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
            response = session.head(current, allow_redirects=False, timeout=timeout)
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
        raise _Transient(f"{url}: {type(error).__name__}: {error}") from error
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
        with open(path, "rb") as fh:
            remaining = length
            while remaining > 0:
                data = fh.read(min(CHUNK_BYTES * 8, remaining))
                if not data:
                    raise OSError(f"{path} shorter than {length} bytes")
                self.update(data)
                remaining -= len(data)


def sha256_file(path: Path) -> str:
    digests = _Digests(None)
    digests.update_from_file(Path(path), Path(path).stat().st_size)
    return digests.sha256.hexdigest()


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


def _write(fh, data: bytes) -> None:
    """The one place bytes hit the disk (tests inject a full disk here)."""
    fh.write(data)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Download:
    """One attempt loop for one source on one endpoint, appending to ``part``."""

    def __init__(self, session, source: KnownFile, endpoint: str, part: Path, meter: _Meter,
                 timeout: tuple[float, float], cancel: threading.Event | None, max_attempts: int,
                 backoff: float, revision: str) -> None:
        self.session, self.source, self.endpoint, self.part = session, source, endpoint, part
        self.meter, self.timeout, self.cancel = meter, timeout, cancel
        self.max_attempts, self.backoff = max_attempts, backoff
        self.url = resolve_url(endpoint, source.repo, source.path, revision)

    def _sleep(self, seconds: float) -> None:
        if self.cancel is not None:
            if self.cancel.wait(seconds):
                raise FetchCancelled("cancelled")
        else:
            time.sleep(seconds)

    def _retrying(self, step: Callable[[], object]) -> object:
        """Run ``step`` until it returns; transient failures without progress are bounded."""
        failures = 0
        while True:
            before = self.part.stat().st_size if self.part.exists() else 0
            try:
                return step()
            except _Transient as error:
                after = self.part.stat().st_size if self.part.exists() else 0
                failures = 1 if after > before else failures + 1
                if failures > self.max_attempts:
                    raise _SourceFailed(f"{error} (gave up after {self.max_attempts} attempts)") from error
                delay = error.retry_after if error.retry_after is not None else min(
                    self.backoff * 2 ** (failures - 1), BACKOFF_MAX_S)
                log.info("%s; retrying in %.1f s (%d/%d)", error, delay, failures, self.max_attempts)
                self._sleep(delay)

    def run(self, free_bytes: Callable[[Path], int]) -> tuple[Remote, _Digests, str | None, str]:
        remote: Remote = self._retrying(lambda: probe(self.session, self.url, self.timeout))  # type: ignore[assignment]
        size = remote.size if remote.size is not None else self.source.size
        if self.source.size is not None and size != self.source.size:
            raise _SourceFailed(f"{self.url}: the server's file is {size} bytes, expected {self.source.size}")
        sha256, git_sha1, how = _expected(self.source, remote)
        have = self.part.stat().st_size if self.part.exists() else 0
        if size is not None and have > size:
            log.info("%s is longer than the file (%d > %d bytes): starting over", self.part, have, size)
            self.part.unlink()
            have = 0
        if size is not None:
            need = size - have + DISK_MARGIN_BYTES
            free = free_bytes(self.part.parent)
            if free < need:
                raise NotEnoughSpace(f"not enough disk space in {self.part.parent}: {need / 1e9:.2f} GB needed "
                                     f"({(size - have) / 1e9:.2f} GB still to download), {free / 1e9:.2f} GB free")
        digests = _Digests(size if git_sha1 else None)
        if have:
            log.info("resuming %s from %d bytes", self.source.filename, have)
            digests.update_from_file(self.part, have)
        state = {"digests": digests}
        self._retrying(lambda: self._stream(state, size))
        return remote, state["digests"], sha256 or git_sha1, how

    def _stream(self, state: dict, size: int | None) -> None:
        import requests

        have = self.part.stat().st_size if self.part.exists() else 0
        if size is not None and have == size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout) as response:
                if response.status_code == 416 and have:
                    raise _SourceFailed(f"{self.url}: server refused to resume at byte {have} (HTTP 416)")
                _check_status(response, self.url)
                if response.status_code == 200 and have:
                    log.info("%s ignores Range: downloading %s from the start", self.endpoint, self.source.filename)
                    have = 0
                    state["digests"] = _Digests(size if state["digests"].git is not None else None)
                elif response.status_code == 206:
                    start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                    if start != str(have):
                        raise _Transient(f"{self.url}: asked for byte {have}, got Content-Range {start!r}")
                digests = state["digests"]
                mode = "ab" if have else "wb"
                with open(self.part, mode) as fh:
                    done = have
                    for data in response.iter_content(CHUNK_BYTES):
                        if self.cancel is not None and self.cancel.is_set():
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
                        digests.update(data)
                        done += len(data)
                        self.meter.received += len(data)
                        self.meter.report(done, size, self.endpoint)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
            raise _Transient(f"{self.url}: connection lost ({type(error).__name__})") from error
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


def _download_verified(download: _Download, part: Path, free_bytes: Callable[[Path], int]):
    """Download into ``part`` and verify it: (remote, sha256, how verified, size)."""
    remote, digests, expected, how = download.run(free_bytes)
    size = remote.size if remote.size is not None else download.source.size
    return remote, _verify(part, size, digests, expected, download.url), how, size


def fetch(sources: Sequence[KnownFile], dest: Path | str, *, endpoints: Sequence[str],
          revision: str = "main", offline: bool = False, progress: ProgressCallback | None = None,
          cancel: threading.Event | None = None, verify_existing: bool = False,
          timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S), max_attempts: int = MAX_ATTEMPTS,
          backoff: float = BACKOFF_S, lock_timeout: float = LOCK_WAIT_S, use_fcntl: bool | None = None,
          session=None, free_bytes: Callable[[Path], int] = _free_bytes) -> FetchResult:
    """Download one file (alternative ``sources`` of the same bytes) to ``dest``, verified.

    Endpoints are tried in order, and for each endpoint the sources in order. Returns where the
    file is and how it was verified; raises :class:`FetchError` (with ``manual``) otherwise.
    """
    if not sources:
        raise ValueError("fetch needs at least one source")
    dest = Path(dest)
    part, lock_path = dest.with_name(dest.name + PART_SUFFIX), dest.with_name(dest.name + LOCK_SUFFIX)
    expected_size = sources[0].size
    manual = manual_instructions(dest, sources, endpoints or [DEFAULT_ENDPOINT], revision)

    present = _present(dest, expected_size, sources[0], verify_existing)
    if present is not None:
        return present
    if offline:
        raise FetchOffline(f"{dest.name} is missing and downloads are off (HF_HUB_OFFLINE / --sd3-no-fetch)", manual)
    if not endpoints:
        raise FetchError(f"{dest.name} is missing and no endpoint is configured", manual)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path, timeout=lock_timeout, use_fcntl=use_fcntl, cancel=cancel)
        lock.__enter__()
    except OSError as error:
        if _is_not_writable(error):
            raise NotWritable(f"cannot write to {dest.parent}: {error.strerror or error}", manual) from error
        raise
    try:
        present = _present(dest, expected_size, sources[0], verify_existing)  # done while we waited?
        if present is not None:
            return present
        if dest.exists() and expected_size is not None and dest.stat().st_size > expected_size:
            raise FetchError(f"{dest} is a different file ({dest.stat().st_size} bytes, expected {expected_size}); "
                             "it is left alone: move or rename it, then fetch again", manual)
        if dest.exists():  # shorter: keep its bytes as a resumable prefix, the digest judges them
            log.warning("%s has %d bytes, expected %s: resuming it as a partial download",
                        dest, dest.stat().st_size, expected_size)
            if not part.exists() or part.stat().st_size < dest.stat().st_size:
                os.replace(dest, part)
            else:
                dest.unlink()
        return _fetch_locked(sources, dest, part, endpoints, revision, progress, cancel, timeout,
                             max_attempts, backoff, session, free_bytes, lock, manual)
    except OSError as error:
        if _is_not_writable(error):
            raise NotWritable(f"cannot write to {dest.parent}: {error.strerror or error}", manual) from error
        if _is_disk_full(error):
            raise NotEnoughSpace(f"disk full in {dest.parent}", manual) from error
        raise
    finally:
        lock.release()


def _present(dest: Path, size: int | None, source: KnownFile, verify: bool) -> FetchResult | None:
    if not dest.is_file() or (size is not None and dest.stat().st_size != size):
        return None
    if verify and source.sha256:
        got = sha256_file(dest)
        if got != source.sha256:
            log.warning("%s has sha256 %s, expected %s: downloading again", dest, got, source.sha256)
            dest.replace(dest.with_name(dest.name + ".bad"))
            return None
        return FetchResult(dest, None, got, "table sha256", 0, 0)
    return FetchResult(dest, None, None, "present", 0, 0)


def _fetch_locked(sources, dest, part, endpoints, revision, progress, cancel, timeout, max_attempts, backoff,
                  session, free_bytes, lock, manual) -> FetchResult:
    import requests

    own_session = session is None
    if own_session:
        session = requests.Session()
        session.headers["User-Agent"] = f"sd-webui-sd3/{__version__}"
    meter = _Meter(dest.name, progress, lock.touch)
    failures: list[str] = []
    try:
        for endpoint in endpoints:
            for source in sources:
                download = _Download(session, source, endpoint, part, meter, timeout, cancel, max_attempts,
                                     backoff, revision)
                resumed = part.stat().st_size if part.exists() else 0
                try:
                    try:
                        remote, sha256, how, size = _download_verified(download, part, free_bytes)
                    except _SourceFailed as error:
                        if not (error.bad_bytes and resumed):
                            raise
                        # The bad bytes may be the resumed prefix (a crash, a copy by hand), not this source's.
                        log.warning("%s; downloading it again from the start", error)
                        part.unlink(missing_ok=True)
                        resumed = 0
                        remote, sha256, how, size = _download_verified(download, part, free_bytes)
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
    finally:
        if own_session:
            session.close()
    tried = "\n".join(f"  - {f}" for f in failures)
    raise FetchError(f"could not download {dest.name} from any endpoint:\n{tried}", manual)
