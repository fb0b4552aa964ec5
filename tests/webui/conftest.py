"""Opt-in suite against a real A1111: ``WEBUI_ROOT`` (dev / v1.10+) and/or ``WEBUI_ROOT_EARLY`` (34b4443c).

Each variable points at an A1111 checkout with a working venv (``<root>/venv/bin/python``, or
``WEBUI_PYTHON`` / ``WEBUI_PYTHON_EARLY``) and its ``repositories/`` in place. Unset, every test here
is skipped. Per state, one session fixture:

1. builds the run's assets with A1111's own classes, in A1111's venv (tests/webui/build_assets.py),
   cached under ``WEBUI_SD3_CACHE`` (default ``~/.cache/sd-webui-sd3-tests``) and reused while the
   builder and A1111's SD3 sources are unchanged;
2. makes a throwaway ``--data-dir`` (models, extensions, config, outputs all live there, so the
   checkout itself gets nothing): this checkout is symlinked into its ``extensions/`` beside a
   test-support extension and two fake IC-Light extensions (old and new shape);
3. starts a T5 mirror on 127.0.0.1 and A1111 on 127.0.0.1 with ``--api`` on the CPU, waits for the
   model, runs the cases, stops A1111 and the mirror, removes the data dir, and checks that the
   checkout's ``git status`` is what it was before.

Cases that ask for ``webui`` with a ``"<state>:<variant>"`` param (:func:`real_iclight_params`) get their
own server of that state whose ``extensions/`` holds, instead of the fakes, the contributor's own
checkouts of the real IC-Light and sd-webui-model-patcher (``SD3_TEST_ICLIGHT_OLD`` /
``SD3_TEST_ICLIGHT_NEW``, ``SD3_TEST_MODEL_PATCHER``), symlinked; ``"<state>:controlnet"`` (:func:`real_controlnet_params`)
gets a copy of the ControlNet extension checkout ``SD3_TEST_CONTROLNET`` beside the fakes. Unset, those cases are skipped.
``webui`` is one session fixture, so pytest stops one server before it starts the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from webui_support import (
    CONTROLNET_VAR,
    MODEL_PATCHER_VAR,
    REAL_ICLIGHT,
    STATES,
    T5_FILE,
    T5_REPO,
    configured_states,
    install_fake_iclight,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
START_TIMEOUT_S = 240.0
"""Server start plus model load; ~25 s measured on this 2-core machine, generous for a loaded one."""
STOP_TIMEOUT_S = 30.0
BUILD_TIMEOUT_S = 600.0

LAUNCH_FLAGS = (
    "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
    "--use-cpu", "all", "--no-half", "--no-half-vae", "--precision", "full", "--api",
    "--server-name", "127.0.0.1", "--no-download-sd-model",
)


REAL_ICLIGHT_FOLDERS = {"iclight": "sd-forge-ic-light", "patcher": "sd-webui-model-patcher"}
"""Folder names of the real IC-Light and model patcher in ``extensions/``: what "Install from URL" names them."""


def _real_iclight_links(variant: str) -> dict[str, Path]:
    """Folder in ``extensions/`` -> the contributor's checkout; skips when a variable is unset."""
    wanted = {REAL_ICLIGHT_FOLDERS["iclight"]: REAL_ICLIGHT[variant], REAL_ICLIGHT_FOLDERS["patcher"]: MODEL_PATCHER_VAR}
    unset = [var for var in wanted.values() if not os.environ.get(var)]
    if unset:
        pytest.skip(f"real IC-Light ({variant}) is opt-in: set {' and '.join(unset)} to checkouts you made")
    links = {folder: Path(os.environ[var]).resolve() for folder, var in wanted.items()}
    expected = {REAL_ICLIGHT_FOLDERS["iclight"]: "scripts/ic_light_script.py",
                REAL_ICLIGHT_FOLDERS["patcher"]: "lib_modelpatcher/model_patcher.py"}
    for folder, path in links.items():
        if not (path / expected[folder]).is_file():
            pytest.fail(f"{wanted[folder]}={path} is not a {folder} checkout (no {expected[folder]})")
    return links


CONTROLNET_FOLDER = "sd-webui-controlnet"


def _real_controlnet_checkout() -> Path:
    """The contributor's ControlNet extension checkout; skips when ``SD3_TEST_CONTROLNET`` is unset."""
    if not os.environ.get(CONTROLNET_VAR):
        pytest.skip(f"the real ControlNet extension is opt-in: set {CONTROLNET_VAR} to a checkout you made")
    path = Path(os.environ[CONTROLNET_VAR]).resolve()
    if not (path / "scripts" / "controlnet.py").is_file():
        pytest.fail(f"{CONTROLNET_VAR}={path} is not a sd-webui-controlnet checkout (no scripts/controlnet.py)")
    return path


RUN_LAST = ("test_real_t5_fetch.py",)
"""Cases that change the server for good (T5 switched on) run after the others of their state."""


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Mark the suite's cases, keep each state's cases together, and put RUN_LAST at the end of each."""
    order = list(STATES)

    def key(indexed):
        index, item = indexed
        if not Path(str(item.fspath)).resolve().is_relative_to(HERE):
            return (0, 0, 0, index)
        param = getattr(item, "callspec", None) and item.callspec.params.get("webui") or ""
        state, _, variant = param.partition(":")
        return (1, order.index(state) if state in order else -1, variant,
                Path(str(item.fspath)).name in RUN_LAST, index)

    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.webui)
    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_status(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _webui_python(state: str, root: Path) -> Path:
    override = os.environ.get("WEBUI_PYTHON" + ("" if state == "dev" else "_EARLY"))
    python = Path(override) if override else root / "venv" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{state}: no A1111 venv python at {python} (set WEBUI_PYTHON{'' if state == 'dev' else '_EARLY'})")
    return python


def _assets_key(root: Path) -> str:
    vocab = HERE.parent.parent / "lib_sd3" / "tokens" / "tokenizers.py"  # write_clip_vocab
    digest = hashlib.sha256((HERE / "build_assets.py").read_bytes() + vocab.read_bytes()
                            + (HERE.parent.parent / "lib_sd3" / "models" / "mmdit.py").read_bytes()
                            + (HERE.parent.parent / "lib_sd3" / "controlnet" / "model.py").read_bytes()
                            + (HERE.parent.parent / "lib_sd3" / "controlnet" / "joint.py").read_bytes())
    for path in sorted((root / "modules" / "models" / "sd3").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


KEPT_BUILDS = 3
"""Asset builds kept per A1111 state (~2.4 GB each)."""


def build_assets(state: str, root: Path, python: Path) -> Path:
    """The cached asset folder for this A1111 state, built on first use (~30 s, ~2.4 GB)."""
    cache = Path(os.environ.get("WEBUI_SD3_CACHE", Path.home() / ".cache" / "sd-webui-sd3-tests"))
    out = cache / f"{state}-{_assets_key(root)}"
    if (out / "manifest.json").exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    result = subprocess.run([str(python), str(HERE / "build_assets.py"), "--webui", str(root), "--out", str(partial)],
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if result.returncode != 0:
        pytest.fail(f"{state}: building assets in A1111's venv failed:\n{result.stderr[-4000:]}")
    partial.rename(out)
    # Builds for other builders or A1111 sources: keep the newest few, since another checkout's run may be
    # serving from one right now (deleting it under a running A1111 makes that run hang on a missing file).
    builds = sorted((p for p in cache.glob(f"{state}-*") if p != out and not p.name.endswith(".partial")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in builds[KEPT_BUILDS - 1:]:
        shutil.rmtree(stale, ignore_errors=True)
    return out


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    """A Hugging Face ``resolve`` endpoint for one file: HEAD/GET, Range, ``X-Linked-Etag`` = sha256."""

    files: dict[str, Path] = {}
    digests: dict[str, str] = {}
    requests: list[str] = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        type(self).requests.append(f"{self.command} {path} {self.headers.get('Range', '')}".strip())
        file = self.files.get(path)
        if file is None:
            self.send_error(404)
            return
        size = file.stat().st_size
        start, end = 0, size - 1
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            start = int(first or 0)
            end = int(last) if last else size - 1
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{self.digests[path]}"')
        self.send_header("X-Linked-Etag", f'"{self.digests[path]}"')
        self.send_header("X-Linked-Size", str(size))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            with open(file, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def do_GET(self):  # noqa: N802
        self._serve(body=True)


@dataclass
class Mirror:
    url: str
    server: http.server.ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)


@contextlib.contextmanager
def t5_mirror(assets: Path, manifest: dict):
    """Serve the reduced T5 at ``/{T5_REPO}/resolve/main/{T5_FILE}`` on a free loopback port."""
    rel = f"t5-reduced/{T5_FILE}"
    handler = type("Handler", (_MirrorHandler,), {
        "files": {f"/{T5_REPO}/resolve/main/{T5_FILE}": assets / rel},
        "digests": {f"/{T5_REPO}/resolve/main/{T5_FILE}": manifest[rel]["sha256"]},
        "requests": [],
    })
    server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Mirror(url=f"http://127.0.0.1:{server.server_address[1]}", server=server, requests=handler.requests)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class WebUI:
    """A running A1111 and what a case needs from it."""

    state: str
    root: Path
    url: str
    log_path: Path
    data_dir: Path
    assets: Path
    manifest: dict
    mirror: Mirror
    process: subprocess.Popen
    t5_config: dict
    variant: str = ""
    """Empty with the fake IC-Lights; ``iclight-old`` / ``iclight-new`` with a real IC-Light checkout; ``controlnet``
    with the real ControlNet extension."""

    def mark(self) -> int:
        """Where the server log ends now; pass to :meth:`log_since` to read what a case caused."""
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")

    def request(self, method: str, path: str, **kwargs):
        import httpx

        kwargs.setdefault("timeout", 300.0)
        return httpx.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, payload: dict | None = None, **kwargs):
        return self.request("POST", path, json=payload or {}, **kwargs)

    def sd3_route(self, method: str, path: str, payload: dict | None = None):
        """Call an extension route; skip the case when this build of the extension lacks it (404)."""
        response = self.request(method, path, **({"json": payload} if payload is not None else {}))
        if response.status_code == 404 and "Not Found" in response.text:
            pytest.skip(f"{path} is absent (404): that feature is not in this build of the extension yet")
        return response

    def status(self) -> dict:
        response = self.get("/sd3/status")
        response.raise_for_status()
        return response.json()


def _wait_ready(process: subprocess.Popen, url: str, log_path: Path, state: str) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if process.poll() is not None:
            pytest.fail(f"{state}: A1111 exited with {process.returncode}:\n{log_path.read_text()[-6000:]}")
        log = log_path.read_text(errors="replace")
        # "Startup time:" comes after app_started callbacks (our /sd3 routes); the model may load before or after.
        if "Model loaded in" in log and "Startup time:" in log:
            try:
                if httpx.get(url + "/sdapi/v1/options", timeout=10).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    pytest.fail(f"{state}: A1111 not ready after {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-6000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)


def _make_data_dir(data_dir: Path, assets: Path, real_iclight: dict[str, Path], controlnet: Path | None = None) -> None:
    models = data_dir / "models"
    models.mkdir(parents=True)
    for name in ("Stable-diffusion", "VAE-approx", "ControlNet"):
        (models / name).symlink_to(assets / name)
    (models / "CLIP").mkdir()  # a real folder: the fetch case downloads T5 into it
    for name in ("clip_g.safetensors", "clip_l.safetensors"):
        (models / "CLIP" / name).symlink_to(assets / "CLIP" / name)
    extensions = data_dir / "extensions"
    extensions.mkdir()
    (extensions / "sd-webui-sd3").symlink_to(REPO, target_is_directory=True)
    shutil.copytree(HERE / "support_extension", extensions / "sd3-test-support")
    if real_iclight:  # the contributor's checkouts, linked (never copied, never into the A1111 checkout)
        for folder, checkout in real_iclight.items():
            (extensions / folder).symlink_to(checkout, target_is_directory=True)
    else:
        install_fake_iclight(extensions)  # tests/a1111/iclight, the unit suite's pair
    if controlnet is not None:  # copied (it writes annotator downloads into its own folder), without .git: a
        # checkout with no remote costs a startup traceback when A1111 reads its git metadata
        shutil.copytree(controlnet, extensions / CONTROLNET_FOLDER, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    # No live previews (keeps the CPU for the cases); T5 off until the fetch case asks for it, so no case
    # before it sees a download start by itself.
    (data_dir / "config.json").write_text(json.dumps({"live_previews_enable": False, "sd3_t5_mode": "off"}),
                                          encoding="utf-8")


MIXDQ_SHIPPED = REPO / "lib_sd3" / "mixdq" / "configs" / "w8a8.yaml"
MMDIT_PREFIX = "model.diffusion_model."


def tiny_mixdq_config(data_dir: Path) -> Path | None:
    """The shipped W8A8 config cut down to the layers the tiny MMDiT has (None without MixDQ in this build).

    Shipped configs that list SD3 Medium's 24 blocks by name are, rightly, a config error on the
    depth-2 test model (pattern configs fit it as they are). The extension's ``--sd3-mixdq PATH``
    makes this file the one "w8a8" means.
    """
    if not MIXDQ_SHIPPED.exists():
        return None
    import yaml
    from safetensors import safe_open

    checkpoint = data_dir / "models" / "Stable-diffusion" / "sd3-tiny.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        linears = {key[len(MMDIT_PREFIX):-len(".weight")] for key in f.keys()
                   if key.startswith(MMDIT_PREFIX) and key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2}
    config = yaml.safe_load(MIXDQ_SHIPPED.read_text(encoding="utf-8"))
    config["name"] = "tiny-w8a8"
    for key, value in list(config.items()):  # patterns ("*") fit any depth and stay
        if isinstance(value, dict) and key != "name":
            config[key] = {layer: bits for layer, bits in value.items() if layer in linears or "*" in layer}
        elif isinstance(value, list):
            config[key] = [layer for layer in value if layer in linears or "*" in layer]
    path = data_dir / "models" / "sd3_mixdq" / "tiny-w8a8.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _extension_flags(data_dir: Path) -> list[str]:
    """Flags of this build of the extension the run needs (A1111 refuses flags nobody declared)."""
    declared = "".join(path.read_text(encoding="utf-8") for path in (REPO / "preload.py", REPO / "lib_sd3" / "webui" /
                       "flags.py") if path.exists())
    mixdq = tiny_mixdq_config(data_dir)
    return ["--sd3-mixdq", str(mixdq)] if mixdq is not None and "--sd3-mixdq" in declared else []


def _start_float(url: str) -> None:
    """``--sd3-mixdq PATH`` turns MixDQ on for the session; every case starts from the float model."""
    import httpx

    if httpx.get(url + "/sd3/mixdq", timeout=60).status_code == 200:
        httpx.post(url + "/sd3/mixdq", json={"config": "off"}, timeout=300).raise_for_status()


@pytest.fixture(scope="session", params=configured_states() or ["unset"])
def webui(request, tmp_path_factory):
    state, _, variant = request.param.partition(":")
    if state == "unset":
        pytest.skip("real-WebUI suite is opt-in: set WEBUI_ROOT (A1111 dev) and/or WEBUI_ROOT_EARLY (34b4443c)")
    real_iclight = _real_iclight_links(variant) if variant.startswith("iclight") else {}
    controlnet = _real_controlnet_checkout() if variant == "controlnet" else None
    root = Path(os.environ[STATES[state]]).resolve()
    if not (root / "launch.py").exists() or not (root / "modules" / "models" / "sd3").is_dir():
        pytest.fail(f"{state}: {root} is not an SD3-capable A1111 checkout")
    python = _webui_python(state, root)
    checkouts = [root, *real_iclight.values(), *([controlnet] if controlnet else [])]
    before = {path: _git_status(path) for path in checkouts}
    started = time.monotonic()
    assets = build_assets(state, root, python)
    manifest = json.loads((assets / "manifest.json").read_text())
    t5_config = json.loads((assets / "t5-reduced" / "config.json").read_text())
    label = f"{state}-{variant}" if variant else state
    data_dir = tmp_path_factory.mktemp(f"webui-data-{label}")
    _make_data_dir(data_dir, assets, real_iclight, controlnet)
    log_path = tmp_path_factory.mktemp(f"webui-log-{label}") / "server.log"
    port = _free_port()
    with t5_mirror(assets, manifest) as mirror:
        env = dict(os.environ)
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "COMMANDLINE_ARGS", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE"):
            env.pop(var, None)
        rel = f"t5-reduced/{T5_FILE}"
        env.update({
            # TRANSFORMERS_OFFLINE keeps transformers (and huggingface_hub, which reads it too) on the cache;
            # HF_HUB_OFFLINE stays unset because the extension's own fetcher honours it (the fetch case).
            "HF_HOME": str(assets / "hf"), "TRANSFORMERS_OFFLINE": "1",
            "HF_ENDPOINT": mirror.url, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(os.cpu_count() or 2),
            "SD3_TEST_T5": json.dumps({"config": t5_config, "filename": T5_FILE,
                                       "size": manifest[rel]["bytes"], "sha256": manifest[rel]["sha256"]}),
        })
        command = [str(python), "launch.py", "--data-dir", str(data_dir), *LAUNCH_FLAGS, "--port", str(port),
                   "--ckpt", str(data_dir / "models" / "Stable-diffusion" / "sd3-tiny.safetensors"),
                   *_extension_flags(data_dir)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            ready = _wait_ready(process, f"http://127.0.0.1:{port}", log_path, state)
            if "[sd3-test-support]" not in log_path.read_text(errors="replace"):
                pytest.fail(f"{state}: the test-support extension did not load:\n{log_path.read_text()[-4000:]}")
            _start_float(f"http://127.0.0.1:{port}")
            print(f"\n[webui {label}] {root}: assets+start {time.monotonic() - started:.1f} s "
                  f"(server ready {ready:.1f} s); T5 tokenizer is a small stand-in sentencepiece model, "
                  f"so T5 counts are not real T5's; T5 weights are reduced to {t5_config}")
            yield WebUI(state=state, root=root, url=f"http://127.0.0.1:{port}", log_path=log_path,
                        data_dir=data_dir, assets=assets, manifest=manifest, mirror=mirror, process=process,
                        t5_config=t5_config, variant=variant)
        finally:
            _stop(process)
            keep = os.environ.get("WEBUI_KEEP_LOG")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(log_path, Path(keep) / f"server-{label}.log")
            shutil.rmtree(data_dir, ignore_errors=True)
    for path in checkouts:
        after = _git_status(path)
        if before[path] != after:
            pytest.fail(f"{label}: {path} changed during the run:\nbefore:\n{before[path]}\nafter:\n{after}")
