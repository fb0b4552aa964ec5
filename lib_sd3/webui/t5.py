"""T5-XXL in A1111: fetched in the background, attached without a restart, never fatal.

How A1111 does it (both SD3 states): ``SD3Cond.__init__`` builds a T5 in ``devices.dtype`` when
``opts.sd3_enable_t5`` is on, and its weight loading downloads ``t5xxl_fp16.safetensors`` with
``load_file_from_url`` -- synchronously, without resume or checksum, and a failure there fails the
whole model load (every txt2img then answers HTTP 500). On a CPU it builds T5 in fp32: 19.6 GB.

What we do instead:
- ``SD3Cond.__init__`` runs with ``sd3_enable_t5`` off, so A1111 never builds or downloads T5 (and
  first makes sure the two tokenizers are in the Hub cache, fetched through our mirrors).
- After every model load (``on_model_loaded``, which also covers start-up) and after a fetch ends,
  :meth:`T5Attachment.decide` picks a precision that fits free memory (``auto`` never picks one
  that does not), attaches a T5 built on the meta device and loaded with its weights kept in the
  file's dtype (or fp8), and switches ``sd3_enable_t5`` on. Only the text encoder changes. A file
  the user put in models/CLIP is used when its header is a T5-XXL encoder (:mod:`lib_sd3.t5_file`),
  whatever its length, and never replaced. A missing file is fetched by :class:`T5Download` in a
  background thread (console tqdm, ``GET /sd3/t5``, the SD3 accordion); generations meanwhile run
  without T5 and say so in the infotext (``SD3 T5``).
- CLIP-L/G downloads A1111 asks for go through the same fetcher (mirrors, resume, sha256).

The state lives in one :class:`T5Feature` built at start-up (:data:`T5`) from a :class:`T5Setup`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lib_sd3 import fetch as fetcher
from lib_sd3 import get_logger
from lib_sd3 import t5 as t5_lib
from lib_sd3.fetch.known_files import CLIP_G, CLIP_L, T5_FP8, T5_FP16, TOKENIZER_REPOS, KnownFile, sources
from lib_sd3.nan_guard import NanGuard, first_finite
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.t5_file import T5FileCheck, check_t5_file
from lib_sd3.webui import hooks, settings
from lib_sd3.webui.capabilities import a1111_module, model_is_sd3, queue_lock, sd3_cond_class
from lib_sd3.webui.flags import flag
from lib_sd3.webui.registry import REGISTRY

log = get_logger("t5")

FEATURE = "T5-XXL"
INFOTEXT = settings.BY_KEY["sd3_t5_mode"].infotext
T5_FILES = (T5_FP16, T5_FP8)
NAN_HINT = ("Check the T5 file: `python -m lib_sd3 doctor --webui <A1111 folder> --hash` verifies it; delete a bad "
            "one from models/CLIP and it is fetched again. Or set the SD3 setting 'T5-XXL text encoder' (or --sd3-t5) "
            "to off.")
"""What the T5 guard's error says to try: T5 non-finite even in fp32 is a broken file, not fp16 overflow."""


@dataclasses.dataclass(frozen=True)
class T5Setup:
    """What the T5 feature is built with: where each file comes from and how to fetch it.

    ``fetch_options`` holds the patience (timeouts, back-off, give-up bound); endpoints, offline,
    progress and cancel are filled per download from the current settings.
    """

    sources: Mapping[str, tuple[KnownFile, ...]]
    fetch_options: fetcher.FetchOptions = fetcher.FetchOptions()
    tokenizer_options: fetcher.FetchOptions = fetcher.FetchOptions(max_attempts=1, backoff=0.0, timeout=(5.0, 15.0),
                                                                   give_up_s=30.0)  # at model load: fail fast


def default_setup() -> T5Setup:
    return T5Setup({name: sources(name) for name in (T5_FP16, T5_FP8, CLIP_L, CLIP_G)})


# --------------------------------------------------------------------------------------- configuration
def requested_mode() -> str:
    """``--sd3-t5``, else the setting. A pasted infotext may set the setting to what a generation
    recorded (``off (downloading 42%)``, ``fp16 (recomputed in bf16)``): its first word is the mode."""
    value = str(flag("sd3_t5") or settings.get("sd3_t5_mode") or "auto").split(" ", 1)[0]
    return value if value in t5_lib.MODES else "auto"


def fetch_allowed() -> bool:
    return bool(settings.get("sd3_fetch")) and not flag("sd3_no_fetch") and not fetcher.is_offline()


def endpoints() -> list[str]:
    return fetcher.endpoints_in_order(flag("sd3_mirror"), settings.get("sd3_mirrors"))


def clip_dir() -> Path:
    from modules import shared

    return Path(shared.models_path) / "CLIP"


def fetch_options(base: fetcher.FetchOptions, **per_call: Any) -> fetcher.FetchOptions:
    """``base`` with this moment's endpoints and offline state (settings may change at any time)."""
    return dataclasses.replace(base, endpoints=tuple(endpoints()), offline=not fetch_allowed(), **per_call)


# ---------------------------------------------------------------------------------- A1111 shapes used
def _a1111_t5() -> tuple[Any, dict] | None:
    """(T5XXLModel, T5_CONFIG) from whichever state this A1111 is in, or None."""
    other = a1111_module("modules.models.sd3.other_impls")
    for name in ("modules.models.sd3.sd3_cond", "modules.models.sd3.sd3_model"):
        module = a1111_module(name)
        if module is not None and hasattr(module, "SD3Cond") and hasattr(module, "T5_CONFIG"):
            if other is not None and hasattr(other, "T5XXLModel"):
                return other.T5XXLModel, module.T5_CONFIG
    return None


def _detect_cond() -> str | None:
    cond = sd3_cond_class()
    if cond is None:
        return "no SD3Cond in this A1111 (no SD3 support)"
    if _a1111_t5() is None:
        return "SD3Cond found but not T5XXLModel / T5_CONFIG"
    return None


def _meta_t5() -> Any:
    from modules import devices

    t5_class, config = _a1111_t5()
    return t5_class(config, device="meta", dtype=devices.dtype)


_LAYOUTS: dict[tuple, dict[str, tuple[int, ...]]] = {}  # per T5_CONFIG: building even a meta T5 takes a while


def expected_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the T5 encoder this A1111 builds (its ``T5_CONFIG``), read off a meta model."""
    t5_class, config = _a1111_t5()
    key = (t5_class, tuple(sorted(config.items())))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = {name: tuple(t.shape) for name, t in _meta_t5().transformer.state_dict().items()}
    return _LAYOUTS[key]


def build_t5(path: Path, fp8: bool) -> Any:
    """A1111's T5XXLModel built on the meta device, loaded from ``path`` one tensor at a time with
    weights kept in the file's dtype (or fp8), so it takes the file's size in memory, not
    devices.dtype's, and making fp8 from fp16 never holds more than one fp16 tensor."""
    model = _meta_t5()
    t5_lib.load_keeping_dtypes(model.transformer, t5_lib.read_t5_state(path), fp8=fp8)
    left = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if left:
        raise ValueError(f"{path.name} lacks {len(left)} T5 tensors, e.g. {left[:3]}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _to_device(output: Any, device: Any) -> Any:
    if device is None:
        return output
    if isinstance(output, tuple | list):
        return type(output)(_to_device(item, device) for item in output)
    return output.to(device) if hasattr(output, "to") else output


def _console_progress(name: str) -> Callable[[fetcher.Progress], None] | None:
    """A tqdm bar in the console, fed by fetch progress reports."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar: list[Any] = []

    def report(progress: fetcher.Progress) -> None:
        if progress.state != "downloading":
            return
        if not bar:
            bar.append(tqdm(total=progress.total, initial=0, unit="B", unit_scale=True, desc=f"SD3 {name}"))
        bar[0].update(progress.done - bar[0].n)
        if progress.total is not None and progress.done >= progress.total:
            bar[0].close()

    return report


# ----------------------------------------------------------------------------------------------- files
class T5Files:
    """The T5 files in models/CLIP as the doctor sees them: published, the user's own, unusable, missing."""

    def __init__(self, setup: T5Setup) -> None:
        self.setup = setup
        self._said: set[tuple] = set()  # files already described in the console

    def check(self, name: str) -> T5FileCheck:
        path = clip_dir() / name
        try:
            layout = expected_layout()
        except Exception as error:  # no A1111 T5 to compare with: nothing can be loaded anyway
            return T5FileCheck(name, "unusable" if path.is_file() else "missing", f"no T5 in this A1111: {error!r}")
        result = check_t5_file(path, self.setup.sources[name][0], layout)
        if result.state in ("own", "unusable"):
            stat = path.stat()
            key = (name, stat.st_size, stat.st_mtime_ns, result.state)
            if key not in self._said:
                self._said.add(key)
                log.warning("%s: %s", path, result.detail if result.usable else
                            f"{result.detail}; not used and left alone (move it away to have the published file fetched)")
        return result

    def usable(self) -> set[str]:
        return {name for name in T5_FILES if self.check(name).usable}

    def identity(self, name: str) -> tuple | None:
        """Changes when the file is replaced (size, mtime, inode): then it is loaded again."""
        try:
            stat = (clip_dir() / name).stat()
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns, stat.st_ino


# -------------------------------------------------------------------------------------------- download
class T5Download:
    """One background download at a time into models/CLIP: start / cancel / progress / wait."""

    def __init__(self, setup: T5Setup, files: T5Files, on_done: Callable[[], None]) -> None:
        self.setup, self.files, self.on_done = setup, files, on_done
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.state = "idle"  # idle | fetching | done | failed | offline | unusable (a file we must not replace)
        self.fetching: str | None = None
        self._progress: dict[str, Any] | None = None
        self.error: str | None = None
        self.manual: str | None = None

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return {"fetch_state": self.state, "fetching": self.fetching, "progress": self._progress,
                    "error": self.error, "manual": self.manual}

    def fraction(self) -> float | None:
        with self._lock:
            return self._progress.get("fraction") if self._progress else None

    def start(self, name: str) -> bool:
        """Download ``name`` in a background thread; False when it cannot start. A file of that name
        already there is never replaced: an unusable one is reported, not fetched over."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self.fetching == name
            dest = clip_dir() / name
            manual = fetcher.manual_instructions(dest, self.setup.sources[name], endpoints())
            if dest.exists():
                check = self.files.check(name)
                if check.usable:
                    return False  # nothing to download: it serves as it is
                self.state, self.fetching, self.manual = "unusable", None, manual
                self.error = f"{dest} is there but not usable ({check.detail}); it is left alone: move it away " \
                             "to have the published file fetched"
                return False
            if not fetch_allowed():
                self.state, self.fetching, self.manual = "offline", None, manual
                log.warning("T5 file %s is missing and downloads are off.\n%s", name, manual)
                return False
            self.state, self.fetching, self.error, self.manual, self._progress = "fetching", name, None, None, None
            self._cancel.clear()
            options = fetch_options(self.setup.fetch_options, progress=self._reporter(name), cancel=self._cancel)
            self._thread = threading.Thread(target=self._run, args=(name, dest, options), name="sd3-t5-fetch",
                                            daemon=True)
            self._thread.start()
            return True

    def _reporter(self, name: str) -> Callable[[fetcher.Progress], None]:
        console = _console_progress(name)

        def report(progress: fetcher.Progress) -> None:
            with self._lock:
                self._progress = {"done": progress.done, "total": progress.total, "fraction": progress.fraction,
                                  "rate": progress.rate, "eta": progress.eta, "endpoint": progress.endpoint,
                                  "state": progress.state, "source": progress.source}
            if console is not None:
                console(progress)

        return report

    def _run(self, name: str, dest: Path, options: fetcher.FetchOptions) -> None:
        try:
            fetcher.fetch(self.setup.sources[name], dest, options)
        except fetcher.FetchError as error:
            with self._lock:
                self.state, self.error, self.manual = "failed", error.reason, error.manual
            log.error("T5 download failed; generating without T5. %s\n%s", error.reason, error.manual)
            return
        except Exception as error:  # a background thread must never take anything down
            with self._lock:
                self.state, self.error = "failed", repr(error)
            log.exception("T5 download failed; generating without T5")
            return
        with self._lock:
            self.state, self.fetching = "done", None
        try:
            self.on_done()  # switch T5 on for the loaded model, text encoders only
        except Exception:
            log.exception("T5 downloaded but could not be switched on")

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running download; True when none is running afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()


# ------------------------------------------------------------------------------------------- attaching
@dataclasses.dataclass
class T5Generation:
    """One generation's ``SD3 T5`` infotext entry; the T5 forward reports recomputations to it."""

    params: dict[str, Any]  # the generation's extra_generation_params
    value: str

    def recomputed_in(self, precision: str) -> None:
        self.params[INFOTEXT] = f"{self.value} (recomputed in {precision})"


class T5Attachment:
    """The T5 on the loaded SD3 model's text encoders: decide / attach / detach / status."""

    def __init__(self, files: T5Files, download: T5Download) -> None:
        self.files, self.download = files, download
        self._lock = threading.RLock()
        self.decided_for: str | None = None  # the requested mode the last decision was made for
        self.mode = "off"  # what is attached now: fp16 | fp8 | off
        self.reason = "no SD3 model loaded yet"
        self.loaded_file: str | None = None
        self.loaded_identity: tuple | None = None
        self.precision: str | None = None  # the loaded file's own dtype (bf16, fp8 scaled, ...)
        self.error: str | None = None
        self.recomputed = 0  # prompts whose T5 output was non-finite and recomputed
        self.generation: T5Generation | None = None  # the generation being encoded

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"decided_for": self.decided_for, "mode": self.mode, "reason": self.reason,
                    "loaded_file": self.loaded_file, "precision": self.precision, "error": self.error,
                    "recomputed": self.recomputed}

    def forget(self) -> None:
        """A new SD3Cond starts without T5."""
        with self._lock:
            self.mode, self.loaded_file, self.loaded_identity, self.precision = "off", None, None, None

    def infotext_value(self) -> str:
        """What a generation's ``SD3 T5`` entry says: the precision used, or why T5 was off."""
        if self.mode != "off":
            return self.mode
        state, fraction = self.download.state, self.download.fraction()
        if state == "fetching":
            return f"off (downloading {fraction:.0%})" if fraction is not None else "off (downloading)"
        return {"failed": "off (download failed)", "offline": "off (missing; downloads off)",
                "unusable": "off (T5 file unusable)"}.get(state, "off")

    def _guard_finite(self, model: Any) -> None:
        """Recompute non-finite output wider (:class:`NanGuard`; the generation's infotext notes it),
        and hand the output over on ``devices.device``: with --medvram A1111's hooks do not know this
        late-attached T5, so it may compute on the CPU while CLIP's output is on the GPU."""
        original = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            target = getattr(a1111_module("modules.devices"), "device", None)
            guard = NanGuard(hint=NAN_HINT, finite=first_finite)  # one per call: its recoveries are this prompt's
            output = guard(original, *args, what="T5", **kwargs)
            if guard.recoveries:
                with self._lock:
                    self.recomputed += 1
                    generation = self.generation
                if generation is not None:
                    generation.recomputed_in(guard.recoveries[0].precision.short)
            return _to_device(output, target)

        model.forward = forward

    def _set_t5(self, cond: Any, model: Any | None, queued: bool) -> None:
        """Swap T5 on A1111's SD3Cond (and, on dev, the Sd3T5 wrapper that holds it too).

        ``queued``: take A1111's ``queue_lock`` first, so a swap from our background thread never lands
        in the middle of a generation. Not on the model-load path: A1111 may hold that lock there.
        """
        from modules import shared

        with queue_lock(default=self._lock) if queued else self._lock:
            cond.t5xxl = model
            if hasattr(cond, "model_t5"):
                cond.model_t5.t5xxl = model
            shared.opts.data["sd3_enable_t5"] = model is not None

    def detach(self, sd_model: Any, queued: bool = False) -> None:
        self._set_t5(sd_model.cond_stage_model, None, queued)
        self.forget()

    def attach(self, sd_model: Any, name: str, fp8: bool, queued: bool = False) -> None:
        """Load T5 from ``models/CLIP/<name>`` into the loaded SD3 model's text encoders."""
        cond = sd_model.cond_stage_model
        self._set_t5(cond, None, queued)  # free the old one first: two T5s at once may not fit
        check = self.files.check(name)
        identity = self.files.identity(name)
        model = build_t5(clip_dir() / name, fp8)
        self._guard_finite(model)
        reference = getattr(cond, "clip_l", None)
        if reference is not None:
            model.to(next(reference.parameters()).device)
        self._set_t5(cond, model, queued)
        mode = "fp8" if fp8 else "fp16"
        with self._lock:
            self.mode, self.loaded_file, self.loaded_identity = mode, name, identity
            self.precision, self.error = check.precision, None
        origin = "the user's own file" if check.state == "own" else "the published file"
        log.info("T5-XXL on (%s from %s: %s, %s; %.2f GB)", mode, name, check.precision, origin,
                 t5_lib.parameter_bytes(model) / 1e9)

    def decide(self, sd_model: Any | None = None, queued: bool = False) -> None:
        """Decide T5 for the loaded model: attach what fits and is on disk, fetch what is missing.

        Called after every model load (``queued`` False: A1111 may hold its queue lock there) and
        after a fetch or from the API (``queued`` True).
        """
        from modules import shared

        sd_model = shared.sd_model if sd_model is None else sd_model
        if not model_is_sd3(sd_model) or not hasattr(sd_model, "cond_stage_model"):
            return
        requested = requested_mode()
        cond = sd_model.cond_stage_model
        ram, vram = t5_lib.free_memory()
        if getattr(cond, "t5xxl", None) is not None:  # what it holds now is ours to reuse
            freed = t5_lib.parameter_bytes(cond.t5xxl)
            ram, vram = ram + freed, (vram + freed if vram is not None else None)
        choice = t5_lib.choose_mode(requested, ram, vram)
        plan = t5_lib.plan_files(choice.mode, self.files.usable())
        with self._lock:
            self.decided_for, self.reason = requested, choice.reason
        log.info("T5: %s", choice.reason)
        if plan.load is None:
            if getattr(cond, "t5xxl", None) is not None:
                self._set_t5(cond, None, queued)
            self.forget()
        elif (self.loaded_file, self.mode, self.loaded_identity) != (plan.load, "fp8" if plan.fp8 else "fp16",
                                                                      self.files.identity(plan.load)) \
                or getattr(cond, "t5xxl", None) is None:
            try:
                self.attach(sd_model, plan.load, plan.fp8, queued)
            except Exception as error:  # a bad file must cost T5, never the model
                log.exception("T5 could not be loaded from %s; generating without T5", plan.load)
                self._set_t5(cond, None, queued)
                self.forget()
                with self._lock:
                    self.error = f"loading {plan.load}: {error!r}"
        if plan.fetch is not None:
            self.download.start(plan.fetch)


# --------------------------------------------------------------------------------------------- feature
class T5Feature:
    """Everything T5 in the WebUI: files, download, attachment, and the hooks the script calls."""

    def __init__(self, setup: T5Setup) -> None:
        self.setup = setup
        self.files = T5Files(setup)
        self.download = T5Download(setup, self.files, on_done=lambda: self.attachment.decide(queued=True))
        self.attachment = T5Attachment(self.files, self.download)
        self.patch = Patch.from_swaps("t5.sd3_cond", FEATURE, _detect_cond, self._swaps)

    def configure(self, setup: T5Setup) -> None:
        """Take other sources / fetch options from now on (an application embedding the extension,
        or a test bed whose mirror serves its own reduced T5)."""
        self.setup = self.files.setup = self.download.setup = setup

    # --- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        attachment, download = self.attachment.status(), self.download.progress()
        out = {**attachment, **download, "error": download["error"] or attachment["error"]}
        checks = {name: self.files.check(name) for name in T5_FILES}
        out["requested"] = requested_mode()
        out["fetch_allowed"] = fetch_allowed()
        out["endpoints"] = endpoints()
        out["files"] = {name: check.usable for name, check in checks.items()}
        out["file_states"] = {name: {"state": check.state, "detail": check.detail, "precision": check.precision}
                              for name, check in checks.items()}
        return out

    # --- A1111 patches --------------------------------------------------------------------------------
    def ensure_tokenizers(self) -> None:
        """Put the CLIP and T5 tokenizers into the Hub cache before A1111 asks for them; never raises."""
        for repo in TOKENIZER_REPOS:
            try:
                fetcher.fetch_tokenizer(repo, fetch_options(self.setup.tokenizer_options))
            except fetcher.FetchError as error:
                log.warning("tokenizer %s not cached: %s", repo, error)
            except Exception:
                log.exception("fetching tokenizer %s failed", repo)

    def _cond_init(self, original: Callable[..., None]) -> Callable[..., None]:
        def __init__(cond: Any, *args: Any, **kwargs: Any) -> None:
            from modules import shared

            self.ensure_tokenizers()
            data = shared.opts.data
            saved = data.get("sd3_enable_t5", False)
            data["sd3_enable_t5"] = False  # A1111 must neither build (RAM) nor download (fatal) T5 itself
            try:
                original(cond, *args, **kwargs)
            finally:
                data["sd3_enable_t5"] = saved
            self.attachment.forget()

        return __init__

    def _load_file_from_url(self, original: Callable[..., str]) -> Callable[..., str]:
        """CLIP-L/G downloads through our fetcher; anything else (and T5, which A1111 no longer asks for) as before."""
        known = self.setup.sources

        def load_file_from_url(url: str, *args: Any, model_dir: str | None = None, file_name: str | None = None,
                               **kwargs: Any) -> str:
            name = file_name or os.path.basename(url.split("?")[0])
            if model_dir is None or name not in (CLIP_L, CLIP_G) or "/resolve/" not in url:
                return original(url, *args, model_dir=model_dir, file_name=file_name, **kwargs)
            dest = Path(model_dir) / name
            if dest.is_file():  # as A1111 does: a file the user put there is theirs to choose
                if known[name][0].size not in (None, dest.stat().st_size):
                    log.warning("%s is %d bytes, not the known %d: using it anyway", dest, dest.stat().st_size,
                                known[name][0].size)
                return str(dest)
            try:
                result = fetcher.fetch(known[name], dest, fetch_options(self.setup.fetch_options,
                                                                        progress=_console_progress(name)))
            except fetcher.FetchError as error:
                raise RuntimeError(f"SD3 needs {name}: {error}") from None
            return str(result.path)

        return load_file_from_url

    def _swaps(self) -> list[AttributeSwap]:
        swaps = [AttributeSwap(sd3_cond_class(), "__init__", self._cond_init)]
        modelloader = a1111_module("modules.modelloader")
        if modelloader is not None and hasattr(modelloader, "load_file_from_url"):
            swaps.append(AttributeSwap(modelloader, "load_file_from_url", self._load_file_from_url))
        return swaps

    # --- script hooks, routes, UI ---------------------------------------------------------------------
    def process(self, p: Any, _args: dict[str, Any]) -> None:
        if not model_is_sd3(getattr(p, "sd_model", None)):
            return
        if self.attachment.decided_for != requested_mode():  # the setting changed: apply it now
            self.attachment.decide(p.sd_model)
        value = self.attachment.infotext_value()
        p.extra_generation_params[INFOTEXT] = value
        self.attachment.generation = T5Generation(p.extra_generation_params, value)

    def post_fetch(self) -> dict[str, Any]:
        """``POST /sd3/t5/fetch``: start (or report) the download the current settings call for."""
        from modules import shared

        if model_is_sd3(getattr(shared, "sd_model", None)):
            self.attachment.decide(queued=True)
        else:
            ram, vram = t5_lib.free_memory()
            choice = t5_lib.choose_mode(requested_mode(), ram, vram)
            plan = t5_lib.plan_files(choice.mode, self.files.usable())
            if plan.fetch is not None:
                self.download.start(plan.fetch)
        return self.status()

    def add_routes(self, router: Any) -> None:
        router.add_api_route("/t5", self.status, methods=["GET"])
        router.add_api_route("/t5/fetch", self.post_fetch, methods=["POST"])

    def status_markdown(self) -> str:
        s = self.status()
        line = f"**T5-XXL:** {self.attachment.infotext_value()} — {s['reason']}"
        progress = s["progress"] or {}
        if s["fetch_state"] == "fetching" and progress.get("endpoint"):
            verb = "trying" if progress.get("state") == "connecting" else "downloading from"
            line += f"\n\n{verb} {progress['endpoint']} ({progress.get('source') or s['fetching']})"
        for name, state in s["file_states"].items():
            if state["state"] in ("own", "unusable"):
                line += f"\n\n`{name}`: {state['detail']}"
        if s["fetch_state"] in ("failed", "unusable"):
            line += f"\n\nDownload failed: {s['error']}\n\n```\n{s['manual']}\n```"
        return line

    def build_ui(self, is_img2img: bool) -> None:
        import gradio as gr

        tab = "img2img" if is_img2img else "txt2img"
        with gr.Row():
            text = gr.Markdown(self.status_markdown(), elem_id=f"sd3_t5_status_{tab}")
            refresh_button = gr.Button("Refresh T5 status", elem_id=f"sd3_t5_refresh_{tab}")
            fetch_button = gr.Button("Download T5 now", elem_id=f"sd3_t5_fetch_{tab}")
        refresh_button.click(fn=self.status_markdown, inputs=[], outputs=[text])
        fetch_button.click(fn=lambda: (self.post_fetch(), self.status_markdown())[1], inputs=[], outputs=[text])

    def register(self) -> None:
        """Wire this feature into the extension's registry and hooks (once, at start-up)."""
        REGISTRY.add(self.patch)
        hooks.PROCESS.append(self.process)
        hooks.ROUTES.append(self.add_routes)
        hooks.UI.append(self.build_ui)
        hooks.STATUS[FEATURE] = self.status
        hooks.MODEL_LOADED.append(lambda sd_model: self.attachment.decide(sd_model))


T5 = T5Feature(default_setup())
"""The one T5 feature of this WebUI, built at start-up."""
T5.register()
