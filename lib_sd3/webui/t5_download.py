"""One background download of a published T5-XXL file into models/CLIP: start, cancel, progress, wait.

It knows nothing of what is attached: whoever starts it passes what to do when it ends
(:meth:`T5Download.start`'s ``when_done``), so the download never calls into the attachment, and the
console line about a failure is written by the one who knows whether T5 is on meanwhile.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_sd3 import fetch as fetcher
from lib_sd3 import get_logger
from lib_sd3.webui.t5_files import T5Files
from lib_sd3.webui.text_encoder_fetch import (
    FetchSetup,
    clip_dir,
    console_progress,
    endpoints,
    fetch_allowed,
    fetch_options,
)

log = get_logger("t5")

WhenDone = Callable[[str, "fetcher.FetchError | None"], None]
"""(file name, None when verified and in place, else why it failed)."""


class DownloadState(str, enum.Enum):
    """Where the T5 download stands (``GET /sd3/t5`` ``fetch_state``: the value)."""

    IDLE = "idle"  # nothing asked for yet
    FETCHING = "fetching"
    DONE = "done"  # verified and in place
    FAILED = "failed"  # every source and endpoint tried: ``error`` and ``manual`` say what to do
    OFFLINE = "offline"  # missing, and downloads are off (setting, --sd3-no-fetch, HF_HUB_OFFLINE)
    UNUSABLE = "unusable"  # a file of that name is there, not usable, and is never fetched over


class T5Download:
    """One background download at a time into models/CLIP."""

    def __init__(self, setup: FetchSetup, files: T5Files) -> None:
        self.setup, self.files = setup, files
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.state = DownloadState.IDLE
        self.fetching: str | None = None
        self._progress: dict[str, Any] | None = None
        self.error: str | None = None
        self.manual: str | None = None

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {"fetch_state": self.state.value, "fetching": self.fetching, "progress": self._progress,
                    "error": self.error, "manual": self.manual}

    def fraction(self) -> float | None:
        with self._lock:
            return self._progress.get("fraction") if self._progress else None

    def start(self, name: str, when_done: WhenDone | None = None) -> bool:
        """Download ``name`` in a background thread, then call ``when_done`` (if given); False when it cannot start.
        A file of that name already there is never replaced: an unusable one is reported, not fetched over."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self.fetching == name
            dest = clip_dir() / name
            manual = fetcher.manual_instructions(dest, self.setup.sources[name], endpoints())
            if dest.exists():
                check = self.files.check(name)
                if check.usable:
                    return False  # nothing to download: it serves as it is
                self.state, self.fetching, self.manual = DownloadState.UNUSABLE, None, manual
                self.error = f"{dest} is there but not usable ({check.detail}); it is left alone: move it away " \
                             "to have the published file fetched"
                return False
            if not fetch_allowed():
                self.state, self.fetching, self.manual = DownloadState.OFFLINE, None, manual
                log.warning("T5 file %s is missing and downloads are off.\n%s", name, manual)
                return False
            self.state, self.fetching, self.error, self.manual = DownloadState.FETCHING, name, None, None
            self._progress = None
            self._cancel.clear()
            options = fetch_options(self.setup.fetch_options, progress=self._reporter(name), cancel=self._cancel)
            self._thread = threading.Thread(target=self._run, args=(name, dest, options, when_done),
                                            name="sd3-t5-fetch", daemon=True)
            self._thread.start()
            return True

    def _reporter(self, name: str) -> Callable[[fetcher.Progress], None]:
        console = console_progress(name)

        def report(progress: fetcher.Progress) -> None:
            with self._lock:
                self._progress = {"done": progress.done, "total": progress.total, "fraction": progress.fraction,
                                  "rate": progress.rate, "eta": progress.eta, "endpoint": progress.endpoint,
                                  "state": progress.state, "source": progress.source}
            if console is not None:
                console(progress)

        return report

    def _run(self, name: str, dest: Path, options: fetcher.FetchOptions, when_done: WhenDone | None) -> None:
        failure: fetcher.FetchError | None = None
        try:
            fetcher.fetch(self.setup.sources[name], dest, options)
        except fetcher.FetchError as error:
            failure = error
        except Exception as error:  # a background thread must never take anything down
            log.exception("T5 download of %s stopped by an unexpected error", name)
            failure = fetcher.FetchError(repr(error), "")
        with self._lock:
            if failure is None:
                self.state, self.fetching = DownloadState.DONE, None
            else:
                self.state, self.error, self.manual = DownloadState.FAILED, failure.reason, failure.manual
        if when_done is None:
            if failure is not None:
                log.error("T5 download of %s failed. %s\n%s", name, failure.reason, failure.manual)
            return
        try:
            when_done(name, failure)
        except Exception:
            log.exception("after the T5 download of %s", name)

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running download; True when none is running afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()
