"""How long the walk waits, and what it reports while it does.

The walk ends when no byte has arrived for ``give_up_s`` (180 s by default), so a machine with no
working endpoint hears so within three minutes. Inside that bound every endpoint gets its turn:
endpoint ``k`` of ``n`` may stay silent (before its first byte, or after its last) for at most an
equal share of what is left, ``left / (n - k)``. Three silent mirrors in front of huggingface.co
therefore cost 45 s each, and huggingface.co is still asked with 45 s to spare, where a full read
timeout per mirror (60 s) used to spend the whole bound before it. Local work (hashing a resumed
``.part`` from disk) pauses the clock: it is not the network's silence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

from lib_sd3 import get_logger
from lib_sd3.fetch.errors import EndpointDown, GiveUp

log = get_logger("fetch")

PROGRESS_INTERVAL_S = 0.5


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


class Clock:
    """The walk's patience (see the module docstring): :meth:`left` is how long the next request may wait."""

    def __init__(self, give_up_s: float, endpoints: int) -> None:
        self.give_up_s = give_up_s
        self.endpoints = max(endpoints, 1)
        self.last_byte = time.monotonic()
        self.waiting = self.endpoints  # endpoints not yet given up, the current one included
        self.share = give_up_s
        self.deadline = self.last_byte + give_up_s  # the current endpoint's

    def walk_left(self) -> float:
        return self.give_up_s - (time.monotonic() - self.last_byte)

    def start_endpoint(self, index: int) -> None:
        """Endpoint ``index`` (0-based) starts: give it its share of what is left."""
        self.waiting = self.endpoints - index
        self.share = max(self.walk_left(), 0.0) / self.waiting
        self.deadline = time.monotonic() + self.share

    def got_bytes(self) -> None:
        now = time.monotonic()
        self.last_byte = now
        self.deadline = now + self.give_up_s / self.waiting

    def left(self) -> float:
        """Seconds the next wait may take; raises when the walk's bound or this endpoint's share is spent."""
        walk = self.walk_left()
        if walk <= 0:
            raise GiveUp(f"no byte received for {self.give_up_s:.0f} s")
        own = self.deadline - time.monotonic()
        if own <= 0:
            raise EndpointDown(f"silent for its share of the wait ({self.share:.0f} s of the "
                               f"{self.give_up_s:.0f} s bound, shared with the endpoints after it)")
        return min(walk, own)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Local work (hashing a resumed ``.part``) is not silence from the network."""
        started = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - started
            self.last_byte += spent
            self.deadline += spent


class Meter:
    """Rate and ETA from bytes received in this session (resumed bytes are not "speed")."""

    def __init__(self, filename: str, callback: ProgressCallback | None, clock: Clock) -> None:
        self.filename, self.callback, self.clock = filename, callback, clock
        self.start = time.monotonic()
        self.received = 0
        self.last = 0.0

    def got(self, count: int) -> None:
        self.received += count
        self.clock.got_bytes()

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
        if self.callback is None:
            return
        rate = self.received / max(now - self.start, 1e-9)
        eta = (total - done) / rate if total is not None and rate > 0 else None
        self.callback(Progress(self.filename, done, total, rate, eta, endpoint))
