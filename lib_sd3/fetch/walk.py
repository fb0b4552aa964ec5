""":func:`fetch`: one file, verified, from the first endpoint and source that has it.

In order: a file already at ``dest`` with the expected size is used as is (a file of another size
is the user's and is never touched); ``HF_HUB_OFFLINE`` stops here; the lock; then endpoints in
order, and per endpoint its sources in order. An endpoint that cannot be reached, stays silent for
its share of the wait (:mod:`lib_sd3.fetch.progress`), or fails in any way ``requests`` can fail is
left for the next one; endpoints the bound leaves no time for are named in the error. Only a
``.part`` whose size and digest match is renamed (atomically) to ``dest``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from lib_sd3 import __version__, get_logger
from lib_sd3.fetch.download import (
    Downloaded,
    Job,
    SourceDownload,
    discard_foreign_part,
    fsync_file,
    fsync_folder,
    is_disk_full,
    is_not_writable,
)
from lib_sd3.fetch.endpoints import (
    DEFAULT_ENDPOINT,
    HubAuth,
    hub_auth,
    is_offline,
    manual_instructions,
    parse_endpoints,
)
from lib_sd3.fetch.errors import (
    EndpointDown,
    FetchCancelled,
    FetchError,
    FetchOffline,
    GiveUp,
    LockTimeout,
    NotEnoughSpace,
    NotWritable,
    SourceFailed,
)
from lib_sd3.fetch.known_files import KnownFile
from lib_sd3.fetch.lock import LOCK_WAIT_S, DownloadLock
from lib_sd3.fetch.progress import Clock, Meter, ProgressCallback
from lib_sd3.fetch.remote import MAX_REDIRECTS
from lib_sd3.hashing import sha256_file

log = get_logger("fetch")

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # a stalled stream counts as a dropped connection after this long
GIVE_UP_S = 180.0  # the whole walk over endpoints and sources ends after this long without a byte
MAX_ATTEMPTS = 5  # attempts in a row without a byte of progress, per source and endpoint
BACKOFF_S = 1.0  # first retry delay; doubles each failure in a row
PART_SUFFIX = ".part"


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    """How a :func:`fetch` goes about it: where from, how patient, what to report to.

    ``auth``: the Hub token and the one endpoint it may go to; by default read as huggingface_hub
    reads it (:func:`~lib_sd3.fetch.endpoints.hub_auth`), ``None`` sends no token. ``give_up_s``:
    the whole walk over endpoints and sources ends after this long without receiving a byte.
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
    auth: HubAuth | None | str = "environment"

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(parse_endpoints(self.endpoints)))

    def hub_auth(self) -> HubAuth | None:
        return hub_auth() if self.auth == "environment" else self.auth  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class FetchResult:
    path: Path
    url: str | None  # None: the file was already there
    sha256: str | None
    verified_by: str  # "table sha256", "server sha256", "git blob id", "size only", "present"
    downloaded: int  # bytes received in this call
    resumed_from: int  # bytes that were already in .part
    commit: str | None = None


def fetch(sources: Sequence[KnownFile], dest: Path | str, options: FetchOptions = FetchOptions()) -> FetchResult:
    """Download one file (alternative ``sources`` of the same bytes) to ``dest``, verified.

    Returns where the file is and how it was verified; raises :class:`FetchError` (with ``manual``)
    otherwise, or the ``OSError`` of a local disk failure that is neither "full" nor "not writable".
    """
    import requests

    if not sources:
        raise ValueError("fetch needs at least one source")
    dest = Path(dest)
    manual = manual_instructions(dest, sources, options.endpoints or [DEFAULT_ENDPOINT], options.revision)
    present = _present(dest, sources[0], options.verify_existing, manual)
    if present is not None:
        return present
    if options.offline or is_offline():
        raise FetchOffline(f"{dest.name} is missing and downloads are off (HF_HUB_OFFLINE / --sd3-no-fetch)", manual)
    if not options.endpoints:
        raise FetchError(f"{dest.name} is missing and no endpoint is configured", manual)
    lock = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = DownloadLock(dest, options.lock_timeout, options.cancel)
        with lock:
            present = _present(dest, sources[0], options.verify_existing, manual)  # done meanwhile?
            if present is not None:
                return present
            return _Walk(sources, dest, options, manual).run()
    except LockTimeout as error:
        part = dest.with_name(dest.name + PART_SUFFIX)
        held = part.stat().st_size if part.exists() else 0
        who = f"process {error.holder}" if error.holder else "another process"
        raise FetchError(f"{dest.name} is being downloaded by {who} (it has {held / 1e9:.2f} GB in {part} so far) "
                         f"and we waited {options.lock_timeout:.0f} s: wait for that download to finish, or stop "
                         "that process, then fetch again", manual) from None
    except (NotEnoughSpace, FetchCancelled) as error:
        raise type(error)(error.reason, manual) from None
    except requests.RequestException as error:  # the walk turns these into outcomes; never let one out as OSError
        raise FetchError(f"{dest.name}: {type(error).__name__}: {error}", manual) from error
    except OSError as error:
        if is_not_writable(error):
            raise NotWritable(f"cannot write to {dest.parent}: {error.strerror or error}", manual) from error
        if is_disk_full(error):
            raise NotEnoughSpace(f"disk full in {dest.parent}", manual) from error
        raise


def _present(dest: Path, source: KnownFile, verify: bool, manual: str) -> FetchResult | None:
    """The published file at ``dest`` (None: nothing there). A file of another size or digest is
    someone else's: it is left exactly as it is, and the fetch stops."""
    if not dest.exists():
        return None
    have = dest.stat().st_size if dest.is_file() else None
    if source.size is not None and have != source.size:
        raise FetchError(f"{dest} is not the published {dest.name} ({have} bytes, expected {source.size}); it is "
                         "left alone: move or rename it to download the published file", manual)
    if verify and source.sha256:
        got = sha256_file(dest)
        if got != source.sha256:
            raise FetchError(f"{dest} has sha256 {got}, not the published {source.sha256}; it is left alone: move "
                             "or rename it to download the published file", manual)
        return FetchResult(dest, None, got, "table sha256", 0, 0)
    return FetchResult(dest, None, None, "present", 0, 0)


class _Walk:
    """Endpoints in order, each one's sources in order, under the lock; collects why each failed."""

    def __init__(self, sources: Sequence[KnownFile], dest: Path, options: FetchOptions, manual: str) -> None:
        self.sources, self.dest, self.options, self.manual = sources, dest, options, manual
        self.part = dest.with_name(dest.name + PART_SUFFIX)
        self.failures: list[str] = []

    def run(self) -> FetchResult:
        import requests

        discard_foreign_part(self.part, self.sources[0].path.endswith(".safetensors"))
        clock = Clock(self.options.give_up_s, len(self.options.endpoints))
        endpoints = self.options.endpoints
        with requests.Session() as session:
            session.headers["User-Agent"] = f"sd-webui-sd3/{__version__}"
            session.max_redirects = MAX_REDIRECTS
            job = Job(session, self.part, Meter(self.dest.name, self.options.progress, clock), clock, self.options,
                      self.options.hub_auth())
            bound_spent = f"no byte received for {self.options.give_up_s:.0f} s"
            for index, endpoint in enumerate(endpoints):
                clock.start_endpoint(index)
                if clock.walk_left() <= 0:  # an endpoint before overran its share: name the ones left out
                    self._gave_up(bound_spent, endpoints[index:])
                    break
                try:
                    result = self._endpoint(job, endpoint)
                    if result is not None:
                        return result
                except EndpointDown as error:
                    self.failures.append(f"{endpoint}: unreachable or silent ({error}); next endpoint")
                    log.warning("%s unreachable or silent, trying the next endpoint: %s", endpoint, error)
                except GiveUp as error:
                    self._gave_up(str(error), endpoints[index + 1:])
                    break
            else:
                if clock.walk_left() <= 0:
                    self._gave_up(bound_spent, [])
        tried = "\n".join(f"  - {f}" for f in self.failures)
        raise FetchError(f"could not download {self.dest.name} from any endpoint:\n{tried}", self.manual)

    def _gave_up(self, why: str, skipped: Sequence[str]) -> None:
        self.failures.append(f"gave up: {why} (every endpoint above failed or stayed silent)")
        if skipped:
            self.failures.append(f"not tried, no time left within the bound: {', '.join(skipped)}")

    def _endpoint(self, job: Job, endpoint: str) -> FetchResult | None:
        """Each source on one endpoint (None: all failed, recorded); raises :class:`EndpointDown` /
        :class:`GiveUp` to move on at once."""
        for source in self.sources:
            download = SourceDownload(job, source, endpoint)
            try:
                done, resumed = self._download(download)
            except SourceFailed as error:
                self.failures.append(str(error))
                log.warning("%s", error)
                if error.bad_bytes:
                    self.part.unlink(missing_ok=True)  # wrong bytes must not seed the next source
                continue
            job.meter.report(self.part.stat().st_size, done.size, endpoint, force=True)
            fsync_file(self.part)
            os.replace(self.part, self.dest)
            fsync_folder(self.dest.parent)
            log.info("%s verified (%s) from %s", self.dest, done.verified_by, endpoint)
            return FetchResult(self.dest, download.url, done.sha256, done.verified_by, job.meter.received,
                               resumed, done.remote.commit)
        return None

    def _download(self, download: SourceDownload) -> tuple[Downloaded, int]:
        """(what came, bytes resumed from): once more from zero when a resumed ``.part`` turned out wrong."""
        resumed = self.part.stat().st_size if self.part.exists() else 0
        try:
            return download.run(), resumed
        except SourceFailed as error:
            if not (error.bad_bytes and resumed):
                raise
            # The bad bytes may be the resumed prefix (a crash, another source), not this source's.
            log.warning("%s; downloading it again from the start", error)
            self.part.unlink(missing_ok=True)
            return SourceDownload(download.job, download.source, download.endpoint).run(), 0
