"""Fetch benchmark against a throttled local resolve-scheme server (tests/hf_mirror.py).

Side by side in one run, on the same server and file:
- throughput_ratio: our fetch's bytes/s over the server's throttle rate (goal >= 0.9);
- resume_overhead: bytes downloaded beyond the file size after the connection drops at 50 %,
  as a fraction of the file (goal <= 1 % + one chunk);
- hash_overhead: our fetch's time (streaming sha256, verification, fsync, rename) over a plain
  ``requests`` stream-to-file of the same URL with no hashing (goal <= 1.05).
Medians of ``--repeats`` runs. The last line holds the key=value pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import requests  # noqa: E402
from hf_mirror import HFMirror  # noqa: E402

from lib_sd3.fetch import CHUNK_BYTES, fetch, resolve_url  # noqa: E402
from lib_sd3.known_files import KnownFile  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=48.0)
    parser.add_argument("--rate-mb", type=float, default=24.0, help="server throttle, MB/s")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size, rate = int(args.size_mb * 1e6), args.rate_mb * 1e6
    data = os.urandom(size)
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
            fetch([source], dest, endpoints=[endpoint])
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
            fetch([source], dest, endpoints=[mirror.endpoint], backoff=0.0)
            assert dest.read_bytes() == data
            overheads.append((mirror.bytes_sent - sent - size) / size)
            dest.unlink()

    throughput_ratio = size / t_ours / rate
    hash_overhead = t_ours / t_plain
    resume_overhead = statistics.median(overheads)
    print(f"file {size / 1e6:.1f} MB, server throttled to {rate / 1e6:.1f} MB/s, {args.repeats} repeats (median)")
    print(f"ours (hash+verify+fsync+rename): {t_ours:.3f} s = {size / t_ours / 1e6:.1f} MB/s")
    print(f"plain requests stream, no hash:  {t_plain:.3f} s = {size / t_plain / 1e6:.1f} MB/s")
    print(f"re-downloaded after a drop at 50 %: {resume_overhead * size / 1e3:.0f} kB "
          f"(one chunk = {CHUNK_BYTES / 1e3:.0f} kB = {CHUNK_BYTES / size:.4f} of the file)")
    print(f"throughput_ratio={throughput_ratio:.3f} resume_overhead={resume_overhead:.4f} "
          f"hash_overhead={hash_overhead:.3f} plain_throughput_ratio={size / t_plain / rate:.3f} "
          f"chunk_fraction={CHUNK_BYTES / size:.4f}")


if __name__ == "__main__":
    main()
