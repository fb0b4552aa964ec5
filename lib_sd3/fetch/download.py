"""One source on one endpoint: probe, check space, stream into ``.part`` while hashing, retry, verify.

``GET`` asks for ``Range: bytes=<part size>-`` and appends; the bytes already in ``.part`` are
hashed from disk first. A dropped connection or timeout retries with exponential back-off from
where it stopped; 429 and 5xx retry too (``Retry-After`` honoured, capped). The first bytes of a
fresh download are looked at before they are kept: an HTML page (a mirror's error page, whatever
its ``Content-Type``) or, for a ``.safetensors`` file, anything that does not start like one is
never written to ``.part``, so it can neither be resumed from nor double the next download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib_sd3 import get_logger
from lib_sd3.fetch.endpoints import HubAuth, resolve_url
from lib_sd3.fetch.errors import EndpointDown, FetchCancelled, NotEnoughSpace, SourceFailed, Transient
from lib_sd3.fetch.known_files import KnownFile
from lib_sd3.fetch.progress import Clock, Meter
from lib_sd3.fetch.remote import Remote, check_status, network_error, probe
from lib_sd3.hashing import sha256_update_from_file
from lib_sd3.safetensors_file import MAX_HEADER_BYTES

if TYPE_CHECKING:
    from lib_sd3.fetch.walk import FetchOptions

log = get_logger("fetch")

CHUNK_BYTES = 256 << 10  # read/write/hash unit; the most a resume re-downloads beyond what was saved
BACKOFF_MAX_S = 30.0
DISK_MARGIN_BYTES = 64 << 20  # keep this much free beyond the file itself
START_BYTES = 64  # how much of a fresh download is looked at before any of it is kept
_HTML_STARTS = (b"<!doctype", b"<html", b"<head", b"<body", b"<title", b"<?xml")


def wrong_start(head: bytes, safetensors: bool) -> str | None:
    """Why ``head`` (a file's first bytes) cannot be the file we want: an HTML page, or, for a
    safetensors file, no safetensors header (8-byte little-endian length, then a JSON object)."""
    text = head[:START_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(_HTML_STARTS) or b"<html" in text:
        return "an HTML page"
    if safetensors and len(head) >= 8:
        (length,) = struct.unpack("<Q", head[:8])
        if length == 0 or length > MAX_HEADER_BYTES or (len(head) > 8 and head[8:9] != b"{"):
            return "something that is not a safetensors file"
    return None


def discard_foreign_part(part: Path, safetensors: bool) -> None:
    """A ``.part`` is only ever ours; one that does not start like the file (an HTML page an older
    version saved, a crash that left garbage) would only be resumed into wrong bytes: delete it."""
    try:
        with open(part, "rb") as fh:
            head = fh.read(START_BYTES)
    except FileNotFoundError:
        return
    why = wrong_start(head, safetensors)
    if why is not None:
        log.warning("%s holds %s, not the start of the file: discarded", part, why)
        part.unlink(missing_ok=True)


def is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def is_not_writable(error: OSError) -> bool:
    return isinstance(error, PermissionError) or error.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def _write(fh, data: bytes | memoryview) -> None:
    """The one place bytes hit the disk: an unbuffered file, so a full disk is reported by the
    write that hit it, never again by a buffer flushed at close."""
    view = memoryview(data)
    while view:
        written = fh.write(view)
        view = view[written:]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class Digests:
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

    def hexdigest(self) -> str:
        return self.git.hexdigest() if self.git is not None else self.sha256.hexdigest()


def expected_digest(source: KnownFile, remote: Remote) -> tuple[str | None, str | None, str]:
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


@dataclasses.dataclass(frozen=True)
class Job:
    """What every source and endpoint of one fetch shares: the HTTP session, the ``.part``, the clock."""

    session: Any
    part: Path
    meter: Meter
    clock: Clock
    options: FetchOptions
    auth: HubAuth | None


@dataclasses.dataclass(frozen=True)
class Downloaded:
    remote: Remote
    size: int | None
    sha256: str
    verified_by: str


class SourceDownload:
    """The attempt loop for one source on one endpoint, appending to ``job.part``; owns the digests
    of what is in ``.part`` (restarted when a server ignores ``Range``)."""

    def __init__(self, job: Job, source: KnownFile, endpoint: str) -> None:
        self.job, self.source, self.endpoint, self.part = job, source, endpoint, job.part
        self.url = resolve_url(endpoint, source.repo, source.path, job.options.revision)
        self.safetensors = source.path.endswith(".safetensors")
        self.digests = Digests(None)
        self.received_at_start = job.meter.received

    # --- patience --------------------------------------------------------------------------------
    def _timeout(self) -> tuple[float, float]:
        left = self.job.clock.left()
        connect, read = self.job.options.timeout
        return min(connect, left), min(read, left)

    def _sleep(self, seconds: float) -> None:
        seconds = min(seconds, self.job.clock.left())
        cancel = self.job.options.cancel
        if cancel is None:
            time.sleep(seconds)
        elif cancel.wait(seconds):
            raise FetchCancelled("cancelled")

    def _retrying(self, step: Callable[[], object]) -> object:
        """Run ``step`` until it returns; at most ``max_attempts`` attempts in a row without progress."""
        failures, attempts = 0, self.job.options.max_attempts
        while True:
            before = _size(self.part)
            try:
                return step()
            except Transient as error:
                if error.unreachable and self.job.meter.received == self.received_at_start:
                    raise EndpointDown(str(error)) from error
                failures = 1 if _size(self.part) > before else failures + 1
                if failures >= attempts:
                    raise SourceFailed(f"{error} (gave up after {failures} attempts)") from error
                delay = error.retry_after if error.retry_after is not None else min(
                    self.job.options.backoff * 2 ** (failures - 1), BACKOFF_MAX_S)
                log.info("%s; retrying in %.1f s (attempt %d of %d)", error, delay, failures + 1, attempts)
                self._sleep(delay)

    # --- the download ----------------------------------------------------------------------------
    def run(self) -> Downloaded:
        """Probe, check space, stream to ``.part``, verify: what came, and how it was verified."""
        have = _size(self.part)
        self.job.meter.trying(have, self.source.size, self.endpoint, self.source.repo)
        remote: Remote = self._retrying(  # type: ignore[assignment]
            lambda: probe(self.job.session, self.url, self._timeout(), self.job.auth))
        size = remote.size if remote.size is not None else self.source.size
        if self.source.size is not None and size != self.source.size:
            raise SourceFailed(f"{self.url}: the server's file is {size} bytes, expected {self.source.size}")
        sha256, git_sha1, how = expected_digest(self.source, remote)
        if size is not None and have > size:
            log.info("%s is longer than the file (%d > %d bytes): starting over", self.part, have, size)
            self.part.unlink()
            have = 0
        if size is not None:
            self._check_space(size, have)
        self.digests = Digests(size if git_sha1 else None)
        if have:
            log.info("resuming %s from %d bytes", self.source.filename, have)
            with self.job.clock.paused():
                sha256_update_from_file(self.digests, self.part, have)
        self._retrying(lambda: self._stream(size))
        return Downloaded(remote, size, self._verify(size, sha256 or git_sha1), how)

    def _check_space(self, size: int, have: int) -> None:
        need = size - have + DISK_MARGIN_BYTES
        free = shutil.disk_usage(self.part.parent).free
        if free < need:
            raise NotEnoughSpace(f"not enough disk space in {self.part.parent}: {need / 1e9:.2f} GB needed "
                                 f"({(size - have) / 1e9:.2f} GB still to download), {free / 1e9:.2f} GB free")

    def _verify(self, size: int | None, expected: str | None) -> str:
        have = self.part.stat().st_size
        if size is not None and have != size:
            raise SourceFailed(f"{self.url}: got {have} bytes, expected {size}", bad_bytes=True)
        got = self.digests.hexdigest()
        if expected is not None and got != expected:
            raise SourceFailed(f"{self.url}: digest mismatch: got {got}, expected {expected} (wrong bytes; deleted)",
                               bad_bytes=True)
        return self.digests.sha256.hexdigest()

    def _stream(self, size: int | None) -> None:
        import requests

        have = _size(self.part)
        if size is not None and have == size:
            return
        headers = {"Range": f"bytes={have}-"} if have else {}
        if self.job.auth is not None:
            headers.update(self.job.auth.headers(self.url))  # requests drops it on a redirect to another host
        try:
            with self.job.session.get(self.url, headers=headers, stream=True, timeout=self._timeout()) as response:
                have = self._accept(response, have, size)
                self._save(response, have, size)
        except requests.RequestException as error:
            raise network_error(self.url, error) from error
        have = self.part.stat().st_size
        if size is not None and have < size:
            raise Transient(f"{self.url}: stream ended at {have} of {size} bytes")

    def _accept(self, response, have: int, size: int | None) -> int:
        """Check the answer to a ``GET``; where it will write from (0 when the server ignored ``Range``)."""
        if response.status_code == 416 and have:
            raise SourceFailed(f"{self.url}: server refused to resume at byte {have} (HTTP 416)")
        check_status(response, self.url)
        if response.status_code == 200 and have:
            log.info("%s ignores Range: downloading %s from the start", self.endpoint, self.source.filename)
            self.digests = Digests(size if self.digests.git is not None else None)
            return 0
        if response.status_code == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                raise Transient(f"{self.url}: asked for byte {have}, got Content-Range {start!r}")
        return have

    def _check_start(self, head: bytes, response) -> None:
        why = wrong_start(head, self.safetensors)
        if why is not None:
            kind = response.headers.get("Content-Type", "no Content-Type")
            raise SourceFailed(f"{self.url}: the endpoint sent {why} instead of the file (HTTP {response.status_code}, "
                               f"{kind}, starting {head[:24]!r}); nothing of it was kept", bad_bytes=True)

    def _save(self, response, have: int, size: int | None) -> None:
        """Append the body to ``.part``, hashing as it goes; a fresh start is looked at before it is kept."""
        cancel = self.job.options.cancel
        pending: bytes | None = b"" if have == 0 else None
        with open(self.part, "ab" if have else "wb", buffering=0) as fh:
            done = have
            for data in response.iter_content(CHUNK_BYTES):
                if cancel is not None and cancel.is_set():
                    raise FetchCancelled(f"cancelled at {done} bytes; {self.part} kept for resuming")
                if pending is not None:
                    pending += data
                    if len(pending) < START_BYTES:
                        continue
                    self._check_start(pending, response)
                    data, pending = pending, None
                done = self._append(fh, data, done, size)
            if pending:  # a body shorter than START_BYTES
                self._check_start(pending, response)
                self._append(fh, pending, done, size)

    def _append(self, fh, data: bytes, done: int, size: int | None) -> int:
        if size is not None and done + len(data) > size:
            raise SourceFailed(f"{self.url}: server sent more than the file's {size} bytes", bad_bytes=True)
        try:
            _write(fh, data)
        except OSError as error:
            if is_disk_full(error):
                raise NotEnoughSpace(f"disk full while writing {self.part} at {done} bytes; "
                                     "free some space and fetch again: it resumes") from error
            raise
        self.digests.update(data)
        done += len(data)
        self.job.meter.got(len(data))
        self.job.meter.report(done, size, self.endpoint)
        return done


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not possible everywhere: then skipped)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
