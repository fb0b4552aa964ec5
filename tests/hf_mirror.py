"""A local stand-in for a Hugging Face endpoint (or a mirror of one) on 127.0.0.1, with faults on demand.

It speaks the ``{endpoint}/{repo}/resolve/{revision}/{path}`` scheme the way the Hub does: for an
LFS file the resolve URL answers ``302`` to a CDN URL, carrying ``X-Linked-Etag`` (the sha256),
``X-Linked-Size`` and ``X-Repo-Commit``; for a small git file it answers ``200`` with the git blob
id as ``ETag``. Knobs on :class:`Faults` switch off Range support, throttle, drop connections at a
fraction of the file, answer 404/403/429/5xx, serve an HTML error page (under any Content-Type),
serve wrong bytes, or redirect badly (a loop, no ``Location``, a non-HTTP URL).
Used by the fetch tests and by benchmarks/bench_fetch.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
import time
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOCK = 16 << 10  # bytes per socket write; the throttle's granularity


@dataclasses.dataclass
class Faults:
    range: bool = True  # honour Range requests
    rate: float | None = None  # bytes/s per connection
    drop_at: tuple[float, ...] = ()  # each GET drops the connection at the next of these fractions, once
    stall_at: tuple[float, ...] = ()  # each GET goes silent at the next of these fractions, once...
    stall_s: float = 5.0  # ...for this long, then closes
    status: int | None = None  # answer every request (HEAD and GET) with this status...
    status_times: int = 10**9  # ...this many times, then serve normally
    retry_after: float | None = None  # Retry-After seconds sent with 429/503
    html: bool = False  # 200 OK, but an HTML error page (as a misconfigured mirror does)...
    html_content_type: str = "text/html; charset=utf-8"  # ...sent as this (mirrors also say octet-stream)...
    html_methods: tuple[str, ...] = ("HEAD", "GET")  # ...to these methods
    corrupt: bool = False  # the right length and start, wrong bytes after the first 64
    lfs: bool = True  # redirect with X-Linked-* headers (LFS file) instead of a plain 200 with a git ETag
    advertise_sha256: str | None = None  # override the X-Linked-Etag the server claims
    advertise_size: int | None = None  # override the X-Linked-Size the server claims
    bad_redirect: str | None = None  # "loop", "no-location" or "ftp": the resolve URL redirects badly...
    bad_redirect_methods: tuple[str, ...] = ("HEAD", "GET")  # ...for these methods
    head: bool = True  # answer HEAD (some mirrors answer 405)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class HFMirror:
    """``with HFMirror() as m: m.add(repo, path, data); fetch(..., endpoints=[m.endpoint])``."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self._digests: dict[tuple[str, str], tuple[str, str]] = {}  # computed once: hashing is not serving
        self.faults = Faults()
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False  # keep-alive handler threads must not hold up the test's end
        self._thread = threading.Thread(target=lambda: self._server.serve_forever(poll_interval=0.02), daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: str, path: str, data: bytes) -> None:
        self.files[(repo, path)] = data
        self._digests[(repo, path)] = (hashlib.sha256(data).hexdigest(), git_blob_sha1(data))

    def __enter__(self) -> HFMirror:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def _take_status(self) -> int | None:
        with self._lock:
            if self.faults.status is not None and self.faults.status_times > 0:
                self.faults.status_times -= 1
                return self.faults.status
        return None

    def _take(self, name: str) -> float | None:
        with self._lock:
            pending = getattr(self.faults, name)
            if pending:
                setattr(self.faults, name, tuple(pending[1:]))
                return pending[0]
        return None

    def _handler(self):
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls that a real server would not add

            def log_message(self, *args) -> None:  # keep test output clean
                return None

            def do_HEAD(self) -> None:
                if not mirror.faults.head:
                    mirror.requests.append(("HEAD", self.path, None))
                    self._plain(405, "Method Not Allowed")
                    return
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _lookup(self) -> tuple[tuple[str, str] | None, bytes | None, bool]:
                path = unquote(self.path.split("?")[0])
                cdn = path.startswith("/cdn/")
                if cdn:
                    path = path[4:]
                parts = path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None, None, cdn
                key = ("/".join(parts[:2]), "/".join(parts[4:]))
                return key, mirror.files.get(key), cdn

            def _plain(self, code: int, text: str, content_type: str = "text/plain", extra: dict | None = None) -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _serve(self, body: bool) -> None:
                faults = mirror.faults
                mirror.requests.append((self.command, self.path, self.headers.get("Range")))
                status = mirror._take_status()
                if status is not None:
                    extra = {"Retry-After": str(faults.retry_after)} if faults.retry_after is not None else {}
                    self._plain(status, f"error {status}", extra=extra)
                    return
                key, data, cdn = self._lookup()
                if data is None:
                    self._plain(404, "Entry not found")
                    return
                if faults.bad_redirect and not cdn and self.command in faults.bad_redirect_methods:
                    self._bad_redirect(faults.bad_redirect)
                    return
                if faults.html and self.command in faults.html_methods:
                    page = "<!DOCTYPE html>\n<html><head><title>503</title></head><body>Mirror maintenance</body></html>"
                    self._plain(200, page, faults.html_content_type)
                    return
                sha256, git_sha1 = mirror._digests[key]
                sha = faults.advertise_sha256 or sha256
                if faults.lfs and not cdn:
                    self.send_response(302)
                    self.send_header("Location", "/cdn" + self.path)
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(faults.advertise_size or len(data)))
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", f'"{sha}"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if faults.corrupt:
                    data = data[:64] + bytes(b ^ 0x5A for b in data[64:])
                start = 0
                requested = self.headers.get("Range")
                if requested and faults.range and requested.startswith("bytes="):
                    start = int(requested[6:].split("-")[0])
                    if start >= len(data):
                        self._plain(416, "Range Not Satisfiable", extra={"Content-Range": f"bytes */{len(data)}"})
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                    if faults.range:
                        self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if not faults.lfs:
                    self.send_header("ETag", f'"{git_sha1}"')
                    self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not body:
                    return
                drop, stall = mirror._take("drop_at"), mirror._take("stall_at")
                cut = drop if drop is not None else stall
                stop = len(data) if cut is None else max(start, int(cut * len(data)))
                self._send(data, start, stop, faults.rate)
                if stall is not None:
                    time.sleep(faults.stall_s)
                if cut is not None:
                    self.close_connection = True
                    self.connection.close()

            def _bad_redirect(self, kind: str) -> None:
                location = {"loop": self.path, "ftp": "ftp://127.0.0.1/file.safetensors", "no-location": None}[kind]
                self.send_response(302)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, data: bytes, start: int, stop: int, rate: float | None) -> None:
                began = time.monotonic()
                sent = 0
                try:
                    for offset in range(start, stop, BLOCK):
                        chunk = data[offset:min(offset + BLOCK, stop)]
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        mirror._count(len(chunk))
                        if rate:
                            ahead = sent / rate - (time.monotonic() - began)
                            if ahead > 0:
                                time.sleep(ahead)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        return Handler
