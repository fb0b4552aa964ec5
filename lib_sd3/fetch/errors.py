"""What a fetch can end with (public), and the outcomes the endpoint walk steers by (internal).

Every way a fetch ends without a verified file is a :class:`FetchError` carrying ``manual``: the
exact URLs, destination and sha256 for a user who has to download the file by hand. A genuine local
disk error that is neither "full" nor "not writable" (an I/O error, say) stays the ``OSError`` it is.
"""

from __future__ import annotations


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


# ------------------------------------------------------------------ internal: how the walk moves on
class SourceFailed(Exception):
    """This source on this endpoint will not work (404, HTML page, bad redirect, wrong bytes): try the next one.

    ``bad_bytes``: what is in ``.part`` came from this source and is wrong, so it is deleted rather
    than used to seed the next source.
    """

    def __init__(self, message: str, bad_bytes: bool = False) -> None:
        super().__init__(message)
        self.bad_bytes = bad_bytes


class Transient(Exception):
    """Worth retrying the same URL (dropped connection, timeout, 429, 5xx).

    ``unreachable``: no connection was made, or it stayed silent (refused, DNS, connect or read
    timeout); before a first byte that condemns the endpoint, not just this attempt.
    """

    def __init__(self, message: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unreachable = unreachable


class EndpointDown(Exception):
    """This endpoint cannot be reached, never answers, or spent its share of the wait: skip its other sources."""


class GiveUp(Exception):
    """No byte arrived for :attr:`FetchOptions.give_up_s`: stop walking endpoints."""
