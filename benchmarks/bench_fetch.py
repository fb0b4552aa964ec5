"""Fetch benchmark against a throttled local resolve-scheme server (tests/hf_mirror.py).

Side by side in one run, on the same server and file:
- throughput_ratio: our fetch's bytes/s over the server's throttle rate (goal >= 0.9);
- resume_overhead: bytes downloaded beyond the file size after the connection drops at 50 %,
  as a fraction of the file (goal <= 1 % + one chunk);
- hash_overhead: our fetch's time (streaming sha256, verification, fsync, rename) over a plain
  ``requests`` stream-to-file of the same URL with no hashing (goal <= 1.05);
- dead_endpoints_s: seconds until a fetch gives up when every endpoint is dead: one refuses the
  connection, one does not resolve, and ``--silent`` (default 2: a user's mirror and huggingface.co)
  accept the connection and never answer. Measured with the real defaults (connect timeout 10 s,
  read timeout 60 s, give-up bound 180 s without a byte), so it takes about two minutes; ``--fast``
  divides the timeouts by 30 for a quick look (goal <= 180 with the defaults);
- endpoints_tried: three silent mirrors, then a good endpoint, at the same timeouts: how many of the four
  were asked before the fetch ended (goal 4/4, and the file comes from the fourth), and how long it took
  (silent_then_good_s, goal <= 180 with the defaults);
- bad_redirects_ok: 1 when each bad redirect (a loop on GET only; no ``Location`` on HEAD+GET and on GET only;
  an ``ftp://`` target on HEAD+GET and on GET only) fails only its endpoint: the next endpoint delivers the
  file, and that endpoint alone ends in a ``FetchError`` (never a ``requests`` exception).
Medians of ``--repeats`` runs. The last line holds the key=value pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from hf_mirror import HFMirror  # noqa: E402

from lib_sd3.fetch import (  # noqa: E402
    CHUNK_BYTES,
    CONNECT_TIMEOUT_S,
    GIVE_UP_S,
    READ_TIMEOUT_S,
    FetchError,
    FetchOptions,
    fetch,
    resolve_url,
)
from lib_sd3.fetch.known_files import KnownFile  # noqa: E402

REPO, PATH = "bench/text-encoders", "t5xxl_bench.safetensors"


def serve(data: bytes, rate: float, conn) -> None:
    """The throttled server in its own process: in ours, its send loop would share the GIL (and
    this 2-core machine) with the client being timed, and slow the client that does more work."""
    with HFMirror() as mirror:
        mirror.add(REPO, PATH, data)
        mirror.faults.rate = rate
        conn.send(mirror.endpoint)
        conn.recv()  # until the parent is done


def plain_download(url: str, dest: Path) -> None:
    """The baseline: what a naive downloader does (stream to a file, no hash, no resume)."""
    with requests.get(url, stream=True, timeout=(10, 60)) as response, open(dest, "wb") as fh:
        response.raise_for_status()
        for data in response.iter_content(CHUNK_BYTES):
            fh.write(data)


def silent_listeners(count: int) -> list[socket.socket]:
    """Endpoints that accept and never answer: the kernel completes the handshake from the backlog."""
    listeners = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        listeners.append(sock)
    return listeners


def was_asked(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def patience(endpoints: list[str], scale: float) -> FetchOptions:
    return FetchOptions(endpoints=endpoints, auth=None, timeout=(CONNECT_TIMEOUT_S * scale, READ_TIMEOUT_S * scale),
                        give_up_s=GIVE_UP_S * scale, backoff=1.0 * scale)


def dead_endpoints_s(source: KnownFile, silent: int, scale: float) -> float:
    """Seconds until fetch() gives up on endpoints that refuse, do not resolve, or never answer."""
    listeners = silent_listeners(silent)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()
    endpoints = [f"http://127.0.0.1:{refused_port}", "http://no-such-mirror.invalid",
                 *(f"http://127.0.0.1:{s.getsockname()[1]}" for s in listeners)]
    options = patience(endpoints, scale)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        try:
            fetch([source, dataclasses.replace(source, repo="other/" + source.repo)], Path(tmp) / PATH, options)
        except FetchError:
            pass
        else:
            raise AssertionError("a fetch from dead endpoints succeeded")
        took = time.perf_counter() - started
    for sock in listeners:
        sock.close()
    return took


def silent_then_good(source: KnownFile, data: bytes, scale: float) -> tuple[int, int, float]:
    """(endpoints asked, endpoints configured, seconds) for three silent mirrors, then a good one."""
    listeners = silent_listeners(3)
    with HFMirror() as good, tempfile.TemporaryDirectory() as tmp:
        good.add(source.repo, source.path, data)
        endpoints = [*(f"http://127.0.0.1:{s.getsockname()[1]}" for s in listeners), good.endpoint]
        dest = Path(tmp) / PATH
        started = time.perf_counter()
        try:
            fetch([source], dest, patience(endpoints, scale))
        except FetchError as error:
            print(f"three silent mirrors then a good one: {error.reason}")
        took = time.perf_counter() - started
        asked = sum(was_asked(s) for s in listeners) + (dest.is_file() and dest.read_bytes() == data)
    for sock in listeners:
        sock.close()
    return asked, len(endpoints), took


BAD_REDIRECTS = (("loop", ("GET",)), ("no-location", ("HEAD", "GET")), ("no-location", ("GET",)),
                 ("ftp", ("HEAD", "GET")), ("ftp", ("GET",)))


def bad_redirects_ok(source: KnownFile, data: bytes) -> bool:
    """Each bad redirect fails its endpoint only: the next one delivers, alone it is a FetchError."""
    ok = True
    with HFMirror() as bad, HFMirror() as good, tempfile.TemporaryDirectory() as tmp:
        bad.add(source.repo, source.path, data)
        good.add(source.repo, source.path, data)
        options = FetchOptions(endpoints=[bad.endpoint, good.endpoint], auth=None, backoff=0.0)
        for i, (kind, methods) in enumerate(BAD_REDIRECTS):
            bad.faults.bad_redirect, bad.faults.bad_redirect_methods = kind, methods
            dest = Path(tmp) / f"r{i}.safetensors"
            try:
                result = fetch([source], dest, options)
                delivered = result.url.startswith(good.endpoint) and dest.read_bytes() == data
            except Exception as error:  # what the user of fetch() would have seen instead of the file
                print(f"bad redirect {kind} on {'+'.join(methods)}: {type(error).__name__}: {error}".splitlines()[0])
                delivered = False
            alone = type(_error_of(fetch, [source], Path(tmp) / f"alone{i}.safetensors",
                                   dataclasses.replace(options, endpoints=(bad.endpoint,)))) is FetchError
            print(f"bad redirect {kind} on {'+'.join(methods)}: next endpoint delivered {delivered}, "
                  f"alone a FetchError {alone}")
            ok = ok and delivered and alone
    return ok


def _error_of(call, *args) -> BaseException | None:
    try:
        call(*args)
    except Exception as error:
        return error
    return None


def safetensors_shaped(size: int) -> bytes:
    """``size`` random bytes behind a real safetensors length prefix and JSON header (fetch looks at the start)."""
    header = b'{"__metadata__":{}}'
    return (struct.pack("<Q", len(header)) + header + os.urandom(size))[:size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=48.0)
    parser.add_argument("--rate-mb", type=float, default=24.0, help="server throttle, MB/s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--silent", type=int, default=2, help="endpoints that accept and never answer")
    parser.add_argument("--fast", action="store_true", help="timeouts / 30 for dead_endpoints_s (not the defaults)")
    args = parser.parse_args()
    size, rate = int(args.size_mb * 1e6), args.rate_mb * 1e6
    data = safetensors_shaped(size)
    source = KnownFile(PATH, REPO, PATH, size, hashlib.sha256(data).hexdigest(), True)

    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(target=serve, args=(data, rate, child), daemon=True)
    server.start()
    endpoint = parent.recv()
    url = resolve_url(endpoint, REPO, PATH)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
            dest = Path(tmp) / f"ours{i}.safetensors"
            started = time.perf_counter()
            fetch([source], dest, FetchOptions(endpoints=[endpoint], auth=None))
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            plain_download(url, Path(tmp) / f"plain{i}.bin")
            plain.append(time.perf_counter() - started)
            dest.unlink()
            (Path(tmp) / f"plain{i}.bin").unlink()
    parent.send("done")
    server.join(10)
    t_ours, t_plain = statistics.median(ours), statistics.median(plain)

    overheads = []
    with HFMirror() as mirror, tempfile.TemporaryDirectory() as tmp:  # bytes, not time: in-process is fine
        mirror.add(REPO, PATH, data)
        mirror.faults.rate = rate
        for i in range(args.repeats):
            mirror.faults.drop_at = (0.5,)
            sent = mirror.bytes_sent
            dest = Path(tmp) / f"resume{i}.safetensors"
            fetch([source], dest, FetchOptions(endpoints=[mirror.endpoint], backoff=0.0, auth=None))
            assert dest.read_bytes() == data
            overheads.append((mirror.bytes_sent - sent - size) / size)
            dest.unlink()

    scale = 1 / 30 if args.fast else 1.0
    dead_s = dead_endpoints_s(source, args.silent, scale)
    asked, configured, silent_good_s = silent_then_good(source, data, scale)
    redirects_ok = bad_redirects_ok(source, data)

    throughput_ratio = size / t_ours / rate
    hash_overhead = t_ours / t_plain
    resume_overhead = statistics.median(overheads)
    print(f"file {size / 1e6:.1f} MB, server throttled to {rate / 1e6:.1f} MB/s, {args.repeats} repeats (median)")
    print(f"ours (hash+verify+fsync+rename): {t_ours:.3f} s = {size / t_ours / 1e6:.1f} MB/s")
    print(f"plain requests stream, no hash:  {t_plain:.3f} s = {size / t_plain / 1e6:.1f} MB/s")
    print(f"re-downloaded after a drop at 50 %: {resume_overhead * size / 1e3:.0f} kB "
          f"(one chunk = {CHUNK_BYTES / 1e3:.0f} kB = {CHUNK_BYTES / size:.4f} of the file)")
    print(f"every endpoint dead (1 refused, 1 unresolvable, {args.silent} silent), timeouts "
          f"{'/ 30 (--fast)' if args.fast else 'at their defaults'}: gave up after {dead_s:.1f} s "
          f"(bound {GIVE_UP_S * scale:.0f} s without a byte)")
    print(f"three silent mirrors then a good endpoint: {asked} of {configured} asked, "
          f"{silent_good_s:.1f} s until the file was there")
    print(f"throughput_ratio={throughput_ratio:.3f} resume_overhead={resume_overhead:.4f} "
          f"hash_overhead={hash_overhead:.3f} plain_throughput_ratio={size / t_plain / rate:.3f} "
          f"chunk_fraction={CHUNK_BYTES / size:.4f} dead_endpoints_s={dead_s:.1f} "
          f"dead_endpoints_defaults={0 if args.fast else 1} endpoints_tried={asked}/{configured} "
          f"silent_then_good_s={silent_good_s:.1f} bad_redirects_ok={int(redirects_ok)}")


if __name__ == "__main__":
    main()
