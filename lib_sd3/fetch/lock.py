"""One writer per destination across processes: the ``filelock`` package (every A1111 venv has it,
torch depends on it), plus a note of who holds it so that a waiter can name the holder.

The lock file is ``.NAME.lock`` beside the file and stays there (hidden, empty): removing a lock
file that another process may be about to lock would let two processes hold "the" lock at once.
``flock`` (``msvcrt`` on Windows) is released by the kernel when its holder dies, so it is never stale.
The holder's process id goes into ``.NAME.holder``, written after the lock is taken and removed
before it is released: ``filelock`` may truncate the lock file itself on every try to take it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from lib_sd3.fetch.errors import FetchCancelled, LockTimeout

LOCK_WAIT_S = 24 * 3600.0  # another process may be downloading 10 GB on a slow line
LOCK_POLL_S = 0.2


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.lock")


def holder_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.holder")


class DownloadLock:
    """``with DownloadLock(dest, timeout, cancel):`` -- only this process writes ``dest`` and its ``.part``."""

    def __init__(self, dest: Path, timeout: float = LOCK_WAIT_S, cancel: threading.Event | None = None) -> None:
        import filelock

        self.dest, self.timeout, self.cancel = Path(dest), timeout, cancel
        self._lock = filelock.FileLock(str(lock_path(self.dest)))
        self._timeout_error = filelock.Timeout

    def holder(self) -> int | None:
        """The process id the current holder wrote down, if readable."""
        try:
            return int(holder_path(self.dest).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> DownloadLock:
        deadline = time.monotonic() + self.timeout
        while True:
            wait = max(0.0, min(LOCK_POLL_S, deadline - time.monotonic()))
            try:
                self._lock.acquire(timeout=wait, poll_interval=min(0.05, LOCK_POLL_S))
                break
            except self._timeout_error:
                pass
            if self.cancel is not None and self.cancel.is_set():
                raise FetchCancelled("cancelled while waiting for another download")
            if time.monotonic() >= deadline:
                raise LockTimeout(f"timed out after {self.timeout:.0f} s waiting for another download", self.holder())
        try:
            holder_path(self.dest).write_text(f"{os.getpid()}\n")
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            holder_path(self.dest).unlink()
        self._lock.release()
