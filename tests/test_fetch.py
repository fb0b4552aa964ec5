"""lib_sd3.fetch against a local resolve-scheme server with faults (tests/hf_mirror.py).

Every test checks the one invariant that matters most: the final path holds either nothing or
exactly the right bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hf_mirror import HFMirror

from lib_sd3.fetch import (
    CHUNK_BYTES,
    DEFAULT_ENDPOINT,
    FetchCancelled,
    FetchError,
    FetchOffline,
    FetchOptions,
    NotEnoughSpace,
    NotWritable,
    download,
    endpoints_in_order,
    fetch,
    is_offline,
    lock,
    resolve_url,
)
from lib_sd3.fetch.known_files import KnownFile
from lib_sd3.hashing import sha256_bytes

ROOT = Path(__file__).resolve().parent.parent
REPO, PATH = "org/text-encoders", "sub dir/t5.safetensors"
SIZE = 2_000_000
FAST = {"backoff": 0.01, "timeout": (2.0, 2.0), "auth": None}


def opts(**overrides) -> FetchOptions:
    return FetchOptions(**{**FAST, **overrides})


def payload(size: int = SIZE, seed: int = 0) -> bytes:
    """``size`` bytes that start like a safetensors file (an 8-byte length, a JSON header), then noise."""
    header = b'{"__metadata__":{}}'
    body = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    return (struct.pack("<Q", len(header)) + header + body)[:size]


DATA = payload()
SHA = sha256_bytes(DATA)


def known(confirmed: bool = True, sha256: str | None = SHA, size: int | None = SIZE, repo: str = REPO) -> KnownFile:
    return KnownFile("t5.safetensors", repo, PATH, size, sha256, confirmed)


@pytest.fixture
def mirror():
    with HFMirror() as m:
        m.add(REPO, PATH, DATA)
        yield m


@pytest.fixture
def mirror2():
    with HFMirror() as m:
        m.add(REPO, PATH, DATA)
        yield m


def assert_good_or_absent(dest: Path) -> None:
    if dest.exists():
        assert dest.read_bytes() == DATA


def lock_is_free(dest: Path) -> bool:
    """Nobody holds the download lock of ``dest``, and no holder note is left behind."""
    import filelock

    other = filelock.FileLock(str(lock.lock_path(dest)))
    try:
        other.acquire(timeout=0)
    except filelock.Timeout:
        return False
    other.release()
    return not lock.holder_path(dest).exists()


def visible(folder: Path) -> list[str]:
    """What a user sees in ``folder`` (the lock file is hidden, and stays: see lib_sd3/fetch/lock.py)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_resolve_url_quotes_path_and_endpoint_slash():
    assert resolve_url("https://hf-mirror.com/", "a/b", "x y/z.bin", "main") == \
        "https://hf-mirror.com/a/b/resolve/main/x%20y/z.bin"


def test_endpoint_order_flag_setting_env_then_hub():
    env = {"HF_ENDPOINT": "https://env.example/"}
    got = endpoints_in_order("https://a.example, https://b.example", "https://c.example https://a.example", env)
    assert got == ["https://a.example", "https://b.example", "https://c.example", "https://env.example",
                   DEFAULT_ENDPOINT]
    assert endpoints_in_order(None, "", {}) == [DEFAULT_ENDPOINT]
    assert is_offline({"HF_HUB_OFFLINE": "1"}) and is_offline({"HF_HUB_OFFLINE": "True"})
    assert not is_offline({"HF_HUB_OFFLINE": "0"}) and not is_offline({})


@pytest.mark.parametrize("lfs, source, how", [
    (True, known(), "table sha256"),
    (True, known(confirmed=False, sha256=None, size=None), "server sha256"),
    (False, known(confirmed=False, sha256=None, size=None), "git blob id"),
])
def test_download_verifies_by_best_available_digest(tmp_path, mirror, lfs, source, how):
    mirror.faults.lfs = lfs
    seen = []
    result = fetch([source], tmp_path / "t5.safetensors", opts(endpoints=[mirror.endpoint], progress=seen.append))
    assert (tmp_path / "t5.safetensors").read_bytes() == DATA
    assert result.verified_by == how and result.sha256 == SHA
    assert visible(tmp_path) == ["t5.safetensors"] and lock_is_free(tmp_path / "t5.safetensors")
    assert seen[-1].done == SIZE and seen[-1].total == SIZE and seen[-1].rate > 0 and seen[-1].eta == 0
    assert [p.done for p in seen] == sorted(p.done for p in seen)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_dropped_connection_resumes_where_it_stopped(tmp_path, mirror, fraction):
    mirror.faults.drop_at = (fraction,)
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA
    ranged = [r for m, _, r in mirror.requests if m == "GET" and r]
    if fraction * SIZE >= CHUNK_BYTES:  # below one chunk nothing was saved yet: no Range to ask for
        assert ranged, "the second GET must ask for a Range"
    # Re-downloaded: at most what was in flight when the connection dropped (one chunk).
    assert mirror.bytes_sent - SIZE <= CHUNK_BYTES
    assert result.downloaded == SIZE


def test_stalled_stream_times_out_and_resumes(tmp_path, mirror):
    mirror.faults.stall_at, mirror.faults.stall_s = (0.5,), 3.0
    dest = tmp_path / "t5.safetensors"
    started = time.monotonic()
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint], backoff=0.01, timeout=(1.0, 0.3)))
    assert dest.read_bytes() == DATA and time.monotonic() - started < 2.5, "the read timeout cut the stall short"
    assert any(r for m, _, r in mirror.requests if m == "GET" and r), "resumed with a Range"
    assert result.downloaded == SIZE


def test_repeated_drops_still_finish(tmp_path, mirror):
    mirror.faults.drop_at = (0.2, 0.4, 0.6, 0.8)
    dest = tmp_path / "t5.safetensors"
    fetch([known()], dest, opts(endpoints=[mirror.endpoint], max_attempts=2))
    assert dest.read_bytes() == DATA


def test_mirror_without_head_still_downloads_and_verifies(tmp_path, mirror):
    mirror.faults.head = False
    mirror.faults.drop_at = (0.5,)
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.verified_by == "table sha256"


def test_server_without_range_support_restarts_from_zero(tmp_path, mirror):
    mirror.faults.range = False
    mirror.faults.drop_at = (0.5,)
    dest = tmp_path / "t5.safetensors"
    fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA
    assert mirror.bytes_sent >= SIZE * 1.5 - 1  # half, then all of it again


@pytest.mark.parametrize("status", [404, 403, 401])
def test_permanent_http_errors_move_to_next_endpoint(tmp_path, mirror, mirror2, status):
    mirror.faults.status = status
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint, mirror2.endpoint]))
    assert dest.read_bytes() == DATA and result.url.startswith(mirror2.endpoint)
    assert len(mirror.requests) == 1, "a permanent error is not retried"


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_transient_http_errors_retry_same_endpoint(tmp_path, mirror, status):
    mirror.faults.status, mirror.faults.status_times, mirror.faults.retry_after = status, 2, 0.05
    dest = tmp_path / "t5.safetensors"
    started = time.monotonic()
    fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA
    assert time.monotonic() - started >= 0.1  # Retry-After was honoured twice


def test_persistent_5xx_gives_up_with_manual_path(tmp_path, mirror):
    mirror.faults.status = 503
    dest = tmp_path / "t5.safetensors"
    with pytest.raises(FetchError) as info:
        fetch([known()], dest, opts(endpoints=[mirror.endpoint], max_attempts=3))
    assert len(mirror.requests) == 3  # max_attempts attempts in all, then stop
    message = str(info.value)
    assert "HTTP 503" in message and "gave up after 3 attempts" in message
    assert resolve_url(mirror.endpoint, REPO, PATH) in message and str(dest) in message and SHA in message
    assert not dest.exists()


def test_html_error_page_from_mirror_is_never_saved(tmp_path, mirror, mirror2):
    mirror.faults.html = True
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint, mirror2.endpoint]))
    assert dest.read_bytes() == DATA and result.url.startswith(mirror2.endpoint)
    mirror2.faults.html = True
    dest.unlink()
    with pytest.raises(FetchError, match="HTML page"):
        fetch([known()], dest, opts(endpoints=[mirror2.endpoint]))
    assert not dest.exists()


def test_wrong_bytes_deleted_then_next_endpoint(tmp_path, mirror, mirror2, caplog):
    mirror.faults.corrupt = True
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint, mirror2.endpoint]))
    assert dest.read_bytes() == DATA and result.url.startswith(mirror2.endpoint)
    assert mirror2.requests[-1][2] is None, "the next endpoint starts from zero, not from the bad bytes"


def test_wrong_bytes_everywhere_leaves_nothing(tmp_path, mirror):
    mirror.faults.corrupt = True
    dest = tmp_path / "t5.safetensors"
    with pytest.raises(FetchError, match="digest mismatch"):
        fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert not dest.exists() and not (tmp_path / "t5.safetensors.part").exists()


def test_unconfirmed_digest_checked_against_server_etag(tmp_path, mirror):
    mirror.faults.advertise_sha256 = "0" * 64  # the server claims another file
    dest = tmp_path / "t5.safetensors"
    with pytest.raises(FetchError, match="digest mismatch"):
        fetch([known(confirmed=False)], dest, opts(endpoints=[mirror.endpoint]))
    assert not dest.exists()
    # A confirmed table digest wins over what a mirror advertises.
    result = fetch([known(confirmed=True)], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.verified_by == "table sha256"


def test_server_size_differs_from_table_tries_next_source(tmp_path, mirror):
    mirror.add("other/repo", PATH, DATA[:-10])
    dest = tmp_path / "t5.safetensors"
    result = fetch([known(repo="other/repo"), known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and f"/{REPO}/" in result.url


@pytest.mark.parametrize("theirs", [DATA[:SIZE // 3], DATA + b"more"], ids=["shorter", "longer"])
def test_other_file_at_destination_is_never_touched(tmp_path, mirror, theirs):
    """A user's own file (another conversion, a copy by hand) is never renamed, truncated or replaced."""
    dest = tmp_path / "t5.safetensors"
    dest.write_bytes(theirs)
    inode = dest.stat().st_ino
    with pytest.raises(FetchError, match="is not the published t5.safetensors.*left alone"):
        fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == theirs and dest.stat().st_ino == inode and mirror.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5.safetensors"]


def test_part_from_crashed_run_is_resumed(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    (tmp_path / "t5.safetensors.part").write_bytes(DATA[:1234567])
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.resumed_from == 1234567
    assert mirror.bytes_sent == SIZE - 1234567


def test_garbage_part_is_discarded_and_downloaded_again(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    (tmp_path / "t5.safetensors.part").write_bytes(b"\0" * 1000)
    fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA


def test_present_file_is_not_downloaded(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    dest.write_bytes(DATA)
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert result.verified_by == "present" and mirror.requests == []


def test_present_but_different_file_left_alone_when_verifying(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    dest.write_bytes(bytes(SIZE))
    with pytest.raises(FetchError, match="not the published.*left alone"):
        fetch([known()], dest, opts(endpoints=[mirror.endpoint], verify_existing=True))
    assert dest.read_bytes() == bytes(SIZE) and sorted(p.name for p in tmp_path.iterdir()) == ["t5.safetensors"]


def test_offline_never_touches_network(tmp_path, mirror):
    with pytest.raises(FetchOffline) as info:
        fetch([known()], tmp_path / "t5.safetensors", opts(endpoints=[mirror.endpoint], offline=True))
    assert mirror.requests == [] and SHA in str(info.value)


def test_not_enough_disk_checked_before_downloading(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    mirror.faults.advertise_size = 1 << 60  # the server's word for the size: more than any disk here
    with pytest.raises(NotEnoughSpace, match="disk space"):
        fetch([known(size=None)], dest, opts(endpoints=[mirror.endpoint]))
    assert all(method == "HEAD" for method, _, _ in mirror.requests)
    assert not dest.exists()


def test_disk_full_mid_stream_keeps_part_then_resumes(tmp_path, mirror, monkeypatch):
    limit = {"left": SIZE // 2}

    def full_disk(fh, data):
        if len(data) > limit["left"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        limit["left"] -= len(data)
        fh.write(data)

    monkeypatch.setattr(download, "_write", full_disk)
    dest = tmp_path / "t5.safetensors"
    with pytest.raises(NotEnoughSpace, match="disk full") as info:
        fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert SHA in info.value.manual
    part = tmp_path / "t5.safetensors.part"
    assert not dest.exists() and 0 < part.stat().st_size <= SIZE // 2
    kept = part.stat().st_size
    monkeypatch.setattr(download, "_write", lambda fh, data: fh.write(data))
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.resumed_from == kept


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_on_a_real_small_tmpfs(tmp_path, mirror):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (not root); the injected-ENOSPC test covers this")
    try:
        dest = small / "t5.safetensors"
        with pytest.raises(NotEnoughSpace):  # the pre-check
            fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
        mirror.faults.head = False  # no size known before the download: no pre-check, the real ENOSPC
        with pytest.raises(NotEnoughSpace) as info:
            fetch([known(size=None)], dest, opts(endpoints=[mirror.endpoint]))
        # The first, useful error, not a second ENOSPC from closing the .part ("disk full in <dir>").
        assert info.value.reason.startswith("disk full while writing") and "it resumes" in info.value.reason
        assert not dest.exists() and (small / "t5.safetensors.part").stat().st_size > 0
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_read_only_models_dir(tmp_path, mirror):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here; the injected EROFS test covers this")
    try:
        with pytest.raises(NotWritable, match="cannot write") as info:
            fetch([known()], ro / "CLIP" / "t5.safetensors", opts(endpoints=[mirror.endpoint]))
        assert SHA in str(info.value) and mirror.requests == []
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_read_only_models_dir_injected(tmp_path, mirror, monkeypatch):
    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system", str(lock.lock_path(self.dest)))

    monkeypatch.setattr(lock.DownloadLock, "__enter__", read_only)
    with pytest.raises(NotWritable):
        fetch([known()], tmp_path / "t5.safetensors", opts(endpoints=[mirror.endpoint]))


def test_cancel_keeps_part_for_resume(tmp_path, mirror):
    mirror.faults.rate = 2_000_000
    cancel = threading.Event()
    dest = tmp_path / "t5.safetensors"

    def stop_halfway(progress):
        if progress.done > SIZE // 4:
            cancel.set()

    with pytest.raises(FetchCancelled):
        fetch([known()], dest, opts(endpoints=[mirror.endpoint], cancel=cancel, progress=stop_halfway))
    part = tmp_path / "t5.safetensors.part"
    assert not dest.exists() and part.stat().st_size > 0
    mirror.faults.rate = None
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.resumed_from > 0


def test_waiter_names_the_holder_and_a_dead_holders_lock_is_free(tmp_path, mirror):
    mirror.faults.rate = 200_000  # ~10 s for the whole file: the child holds the lock all through this test
    dest = tmp_path / "t5.safetensors"
    child = _child(dest, mirror.endpoint)
    try:
        deadline = time.monotonic() + 20
        part = tmp_path / "t5.safetensors.part"
        while not (part.exists() and part.stat().st_size >= CHUNK_BYTES) and time.monotonic() < deadline:
            time.sleep(0.02)
        pattern = f"being downloaded by process {child.pid} .*wait for that download"
        with pytest.raises(FetchError, match=pattern) as info:
            fetch([known()], dest, opts(endpoints=[mirror.endpoint], lock_timeout=0.5))
        assert ".lock" not in info.value.reason
    finally:
        child.kill()  # dies holding the lock: the kernel releases it, nothing is stale
        child.communicate(timeout=20)
    mirror.faults.rate = None
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint], lock_timeout=5))
    assert dest.read_bytes() == DATA and result.resumed_from > 0 and lock_is_free(dest)


_CHILD = textwrap.dedent("""
    import sys, hashlib
    sys.path[:0] = [{root!r}]
    from lib_sd3.fetch import FetchOptions, fetch
    from lib_sd3.fetch.known_files import KnownFile
    src = KnownFile("t5.safetensors", {repo!r}, {path!r}, {size}, {sha!r}, True)
    result = fetch([src], {dest!r}, FetchOptions(endpoints=[{endpoint!r}], backoff=0.01, auth=None,
                   progress=lambda p: print("progress", p.done, flush=True)))
    print("done", result.verified_by, result.downloaded, flush=True)
""")


def _child(dest: Path, endpoint: str) -> subprocess.Popen:
    code = _CHILD.format(root=str(ROOT), repo=REPO, path=PATH, size=SIZE, sha=SHA, dest=str(dest), endpoint=endpoint)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_never_write_the_same_file(tmp_path, mirror):
    mirror.faults.rate = 4_000_000  # ~0.5 s per download: the two overlap
    dest = tmp_path / "t5.safetensors"
    children = [_child(dest, mirror.endpoint) for _ in range(2)]
    outputs = [c.communicate(timeout=60) for c in children]
    assert [c.returncode for c in children] == [0, 0], outputs
    assert dest.read_bytes() == DATA
    assert mirror.bytes_sent == SIZE, "the second process waited and used the first one's file"
    finals = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert finals == ["done present 0", f"done table sha256 {SIZE}"]


def test_ctrl_c_mid_download_then_resume(tmp_path, mirror):
    mirror.faults.rate = 1_000_000  # 2 s for the whole file
    dest = tmp_path / "t5.safetensors"
    part = tmp_path / "t5.safetensors.part"
    child = _child(dest, mirror.endpoint)
    deadline = time.monotonic() + 20
    while not (part.exists() and part.stat().st_size >= CHUNK_BYTES) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=20)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert not dest.exists() and lock_is_free(dest)
    kept = part.stat().st_size
    assert 0 < kept < SIZE
    mirror.faults.rate = None
    sent_before = mirror.bytes_sent
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.resumed_from == kept
    assert mirror.bytes_sent - sent_before == SIZE - kept


def test_hf_hub_offline_environment_alone_keeps_fetch_off_the_network(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchOffline):
        fetch([known()], tmp_path / "t5.safetensors", opts(endpoints=[mirror.endpoint]))
    assert mirror.requests == []


def _refused_endpoint() -> str:
    """A 127.0.0.1 port nobody listens on (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class _Silent:
    """A server that accepts connections and never answers (a stalled proxy or mirror)."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        return self

    def was_asked(self) -> bool:
        """Whether a client connected (the handshake completed into the backlog)."""
        self.sock.setblocking(False)
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def __exit__(self, *exc):
        self.sock.close()


def test_refused_and_unresolvable_endpoints_are_left_at_once(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    sources = [known(repo="other/repo"), known(repo="third/repo"), known()]
    started = time.monotonic()
    seen = []
    result = fetch(sources, dest, opts(endpoints=[_refused_endpoint(), "http://no-such-host.invalid",
                                                  mirror.endpoint], backoff=5.0, progress=seen.append))
    assert dest.read_bytes() == DATA and result.url.startswith(mirror.endpoint)
    assert time.monotonic() - started < 4.0, "no back-off, no retry, no other source on a dead endpoint"
    tried = [p.endpoint for p in seen if p.state == "connecting"]
    assert tried[0].startswith("http://127.0.0.1:") and tried[1] == "http://no-such-host.invalid"
    assert tried[2:] == [mirror.endpoint] * 3, "the UI is told which endpoint is tried, before any byte"


def test_silent_endpoint_left_after_the_read_timeout(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    with _Silent() as silent:
        started = time.monotonic()
        result = fetch([known(repo="other/repo"), known()], dest,
                       opts(endpoints=[silent.endpoint, mirror.endpoint], timeout=(1.0, 0.5), backoff=5.0))
    assert dest.read_bytes() == DATA and result.url.startswith(mirror.endpoint)
    assert time.monotonic() - started < 2.5, "one read timeout, not max_attempts x sources of them"


def test_every_endpoint_dead_gives_up_within_the_bound(tmp_path):
    dest = tmp_path / "t5.safetensors"
    with _Silent() as one, _Silent() as two:
        started = time.monotonic()
        with pytest.raises(FetchError, match="could not download") as info:
            fetch([known(), known(repo="other/repo")], dest,
                  opts(endpoints=[_refused_endpoint(), one.endpoint, two.endpoint], timeout=(1.0, 30.0),
                       give_up_s=1.5))
        took = time.monotonic() - started
    assert took < 2.5, f"gave up after {took:.1f} s; the bound is 1.5 s without a byte"
    assert "gave up: no byte received for 2 s" in str(info.value) and SHA in info.value.manual
    assert not dest.exists()


def test_hub_token_sent_to_the_hub_endpoint_only(tmp_path, mirror, mirror2, monkeypatch):
    from lib_sd3.fetch import hub_auth

    monkeypatch.setenv("HF_ENDPOINT", mirror2.endpoint)  # "the Hub" for this machine
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    seen = {}

    def record(m):
        original = m._server.RequestHandlerClass.parse_request

        def parse_request(self):
            ok = original(self)
            seen.setdefault(m.endpoint, []).append(self.headers.get("Authorization"))
            return ok

        m._server.RequestHandlerClass.parse_request = parse_request

    record(mirror)
    record(mirror2)
    mirror.faults.status = 404
    fetch([known()], tmp_path / "t5.safetensors", opts(endpoints=[mirror.endpoint, mirror2.endpoint],
                                                       auth=hub_auth()))
    assert set(seen[mirror.endpoint]) == {None}, "a mirror never sees the token"
    assert "Bearer hf_secret" in seen[mirror2.endpoint]


def test_saved_token_file_is_read_like_huggingface_hub(tmp_path, monkeypatch):
    from lib_sd3.fetch import hub_auth

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub_auth() is None
    (tmp_path / "token").write_text("hf_saved\n")
    auth = hub_auth()
    assert auth.token == "hf_saved" and auth.endpoint == DEFAULT_ENDPOINT
    assert auth.headers(f"{DEFAULT_ENDPOINT}/x") == {"Authorization": "Bearer hf_saved"}
    assert auth.headers("https://cdn-lfs.huggingface.co/x") == {}
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    assert hub_auth() is None


def test_401_says_how_to_get_in(tmp_path, mirror):
    mirror.faults.status = 401
    with pytest.raises(FetchError, match="HF_TOKEN or run `huggingface-cli login`.*or download it by hand") as info:
        fetch([known()], tmp_path / "t5.safetensors", opts(endpoints=[mirror.endpoint]))
    assert "download ONE of these URLs" in info.value.manual


# ------------------------------------------------------------------ misbehaving endpoints (issue: downloads)
@pytest.mark.parametrize("kind, methods", [
    ("loop", ("GET",)),  # HEAD answers, GET redirects to itself forever
    ("no-location", ("HEAD", "GET")),
    ("no-location", ("GET",)),
    ("ftp", ("HEAD", "GET")),
    ("ftp", ("GET",)),
])
def test_bad_redirects_fail_that_endpoint_and_the_next_one_is_tried(tmp_path, mirror, mirror2, kind, methods):
    mirror.faults.bad_redirect, mirror.faults.bad_redirect_methods = kind, methods
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint, mirror2.endpoint]))
    assert dest.read_bytes() == DATA and result.url.startswith(mirror2.endpoint)
    dest.unlink()
    mirror.requests.clear()
    with pytest.raises(FetchError) as info:  # alone: a FetchError with the manual path, never requests' OSError
        fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert type(info.value) is FetchError and SHA in info.value.manual
    assert {"loop": "redirect", "no-location": "without a Location", "ftp": "not an http"}[kind] in info.value.reason
    assert len([r for r in mirror.requests if r[0] == "GET"]) <= 6, "a bad redirect is not retried"
    assert not dest.exists() and visible(tmp_path) == []


@pytest.mark.parametrize("methods, source", [
    (("GET",), known()),  # HEAD tells the truth (a CDN behind it fails), GET gets the page
    (("HEAD", "GET"), known(size=None)),  # the page everywhere, and no size in the table to compare with
])
def test_html_page_under_a_binary_content_type_is_never_kept(tmp_path, mirror, mirror2, methods, source):
    mirror.faults.html, mirror.faults.html_content_type = True, "application/octet-stream"
    mirror.faults.html_methods = methods
    dest = tmp_path / "t5.safetensors"
    with pytest.raises(FetchError, match="the endpoint sent an HTML page instead of the file"):
        fetch([source], dest, opts(endpoints=[mirror.endpoint]))
    assert visible(tmp_path) == [], "no .part of HTML to resume from"
    result = fetch([source], dest, opts(endpoints=[mirror2.endpoint]))
    assert dest.read_bytes() == DATA and result.resumed_from == 0 and mirror2.bytes_sent == SIZE


def test_part_of_html_left_by_an_older_version_is_discarded_not_resumed(tmp_path, mirror):
    part = tmp_path / "t5.safetensors.part"
    part.write_bytes(b"<html><body><h1>502 Bad Gateway</h1><hr><center>nginx</center></body></html>\r\n" * 2)
    dest = tmp_path / "t5.safetensors"
    result = fetch([known()], dest, opts(endpoints=[mirror.endpoint]))
    assert dest.read_bytes() == DATA and result.resumed_from == 0
    assert mirror.bytes_sent == SIZE, "the file once, not the file plus a failed resume"


def test_three_silent_mirrors_leave_time_for_the_hub(tmp_path, mirror):
    dest = tmp_path / "t5.safetensors"
    seen = []
    with _Silent() as one, _Silent() as two, _Silent() as three:
        started = time.monotonic()
        result = fetch([known()], dest, opts(endpoints=[one.endpoint, two.endpoint, three.endpoint, mirror.endpoint],
                                            timeout=(1.0, 30.0), give_up_s=2.0, progress=seen.append))
        took = time.monotonic() - started
        asked = [s.was_asked() for s in (one, two, three)]
    assert dest.read_bytes() == DATA and result.url.startswith(mirror.endpoint)
    assert asked == [True, True, True] and [p.endpoint for p in seen if p.state == "connecting"][-1] == mirror.endpoint
    assert took < 3.0, f"{took:.1f} s: each silent mirror gets a quarter of the 2 s bound, not a full read timeout"


def test_an_endpoint_with_no_time_left_is_named(tmp_path, mirror):
    """A server that trickles its answer defeats per-read timeouts; the endpoint it starves is named."""
    dest = tmp_path / "t5.safetensors"
    with _Trickle() as slow:
        with pytest.raises(FetchError) as info:
            fetch([known()], dest, opts(endpoints=[slow.endpoint, mirror.endpoint], timeout=(1.0, 0.5),
                                        give_up_s=1.0))
    assert f"not tried, no time left within the bound: {mirror.endpoint}" in info.value.reason
    assert mirror.requests == []


class _Trickle:
    """Accepts, then sends an HTTP 404 answer one byte every 50 ms (about 3 s in all)."""

    ANSWER = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nX-Padding: " + b"." * 20 + b"\r\n\r\n"

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
            with conn:
                for byte in self.ANSWER:
                    conn.sendall(bytes([byte]))
                    time.sleep(0.05)
        except OSError:
            return

    def __exit__(self, *exc):
        self.sock.close()
