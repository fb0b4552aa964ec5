"""T5-XXL in A1111: fetched in the background, attached without a restart, never fatal.

How A1111 does it (both SD3 states): ``SD3Cond.__init__`` builds a T5 in ``devices.dtype`` when
``opts.sd3_enable_t5`` is on, and its weight loading downloads ``t5xxl_fp16.safetensors`` with
``load_file_from_url`` -- synchronously, without resume or checksum, and a failure there fails the
whole model load (every txt2img then answers HTTP 500). On a CPU it builds T5 in fp32: 19.6 GB.

What we do instead:
- ``SD3Cond.__init__`` runs with ``sd3_enable_t5`` off, so A1111 never builds or downloads T5 (and
  first makes sure the two tokenizers are in the Hub cache, fetched through our mirrors).
- After every model load (``on_model_loaded``, which also covers start-up) and after a fetch ends,
  :func:`refresh` picks a precision that fits free memory (``auto`` never picks one that does not),
  attaches a T5 built on the meta device and loaded with its weights kept in the file's dtype (or
  fp8), and switches ``sd3_enable_t5`` on. Only the text encoder changes: no restart, no reload of
  the checkpoint. A missing file is fetched in a background thread (console tqdm, ``GET /sd3/t5``,
  the SD3 accordion); generations meanwhile run without T5 and say so in the infotext (``SD3 T5``).
- CLIP-L/G downloads A1111 asks for go through the same fetcher (mirrors, resume, sha256).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from pathlib import Path
from typing import Any

from lib_sd3 import fetch as fetcher
from lib_sd3 import get_logger
from lib_sd3 import t5 as t5_lib
from lib_sd3.known_files import CLIP_G, CLIP_L, T5_FP8, T5_FP16, TOKENIZER_REPOS, KnownFile, sources
from lib_sd3.nan_guard import NanGuard, first_finite
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, settings
from lib_sd3.webui.capabilities import a1111_module, model_is_sd3, queue_lock, sd3_cond_class
from lib_sd3.webui.flags import flag
from lib_sd3.webui.registry import REGISTRY

log = get_logger("t5")

FEATURE = "T5-XXL"
INFOTEXT = settings.BY_KEY["sd3_t5_mode"].infotext
SOURCES: dict[str, tuple[KnownFile, ...]] = {name: sources(name) for name in (T5_FP16, T5_FP8, CLIP_L, CLIP_G)}
"""Where each file comes from (tests point this at their own small files)."""
FETCH_OPTIONS: dict[str, Any] = {}  # extra fetch() arguments for T5 and CLIP (tests shorten the back-off)
TOKENIZER_FETCH = {"max_attempts": 1, "backoff": 0.0, "timeout": (5.0, 15.0)}  # at model load: fail fast


@dataclasses.dataclass
class T5Status:
    """What ``GET /sd3/t5`` reports; one instance, guarded by ``lock``."""

    decided_for: str | None = None  # the requested mode the last decision was made for
    mode: str = "off"  # what is attached now: fp16 | fp8 | off
    reason: str = "no SD3 model loaded yet"
    loaded_file: str | None = None
    fetching: str | None = None  # file being downloaded
    fetch_state: str = "idle"  # idle | fetching | done | failed | offline
    progress: dict[str, Any] | None = None
    error: str | None = None
    manual: str | None = None
    recomputed: int = 0  # prompts whose T5 output was non-finite and recomputed


STATUS = T5Status()
_lock = threading.RLock()
_thread: threading.Thread | None = None
_cancel = threading.Event()
_current_p: weakref.ReferenceType | None = None


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


def _complete(name: str) -> bool:
    path, size = clip_dir() / name, SOURCES[name][0].size
    return path.is_file() and (size is None or path.stat().st_size == size)


def status() -> dict[str, Any]:
    with _lock:
        out = dataclasses.asdict(STATUS)
    out["requested"] = requested_mode()
    out["fetch_allowed"] = fetch_allowed()
    out["endpoints"] = endpoints()
    out["files"] = {name: _complete(name) for name in (T5_FP16, T5_FP8)}
    return out


def infotext_value() -> str:
    """What a generation's ``SD3 T5`` entry says: the precision used, or why T5 was off."""
    with _lock:
        if STATUS.mode != "off":
            return STATUS.mode
        if STATUS.fetch_state == "fetching" and STATUS.progress and STATUS.progress.get("fraction") is not None:
            return f"off (downloading {STATUS.progress['fraction']:.0%})"
        if STATUS.fetch_state == "fetching":
            return "off (downloading)"
        if STATUS.fetch_state == "failed":
            return "off (download failed)"
        if STATUS.fetch_state == "offline":
            return "off (missing; downloads off)"
        return "off"


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


def ensure_tokenizers() -> None:
    """Put the CLIP and T5 tokenizers into the Hub cache before A1111 asks for them; never raises."""
    for repo in TOKENIZER_REPOS:
        try:
            t5_lib.fetch_tokenizer(repo, endpoints=endpoints(), offline=not fetch_allowed(), **TOKENIZER_FETCH)
        except fetcher.FetchError as error:
            log.warning("tokenizer %s not cached: %s", repo, error)
        except Exception:
            log.exception("fetching tokenizer %s failed", repo)


def _cond_init(original):
    def __init__(self, *args, **kwargs):
        from modules import shared

        ensure_tokenizers()
        data = shared.opts.data
        saved = data.get("sd3_enable_t5", False)
        data["sd3_enable_t5"] = False  # A1111 must neither build (RAM) nor download (fatal) T5 itself
        try:
            original(self, *args, **kwargs)
        finally:
            data["sd3_enable_t5"] = saved
        with _lock:
            STATUS.mode, STATUS.loaded_file = "off", None  # a new SD3Cond starts without T5

    return __init__


def _load_file_from_url(original):
    """CLIP-L/G downloads through our fetcher; anything else (and T5, which A1111 no longer asks for) as before."""

    def load_file_from_url(url: str, *args: Any, model_dir: str | None = None, file_name: str | None = None,
                           **kwargs: Any) -> str:
        name = file_name or os.path.basename(url.split("?")[0])
        if model_dir is None or name not in (CLIP_L, CLIP_G) or "/resolve/" not in url:
            return original(url, *args, model_dir=model_dir, file_name=file_name, **kwargs)
        dest = Path(model_dir) / name
        if dest.is_file():  # as A1111 does: a file the user put there is theirs to choose
            if SOURCES[name][0].size not in (None, dest.stat().st_size):
                log.warning("%s is %d bytes, not the known %d: using it anyway", dest, dest.stat().st_size,
                            SOURCES[name][0].size)
            return str(dest)
        try:
            result = fetcher.fetch(SOURCES[name], dest, endpoints=endpoints(),
                                   offline=not fetch_allowed(), progress=_console_progress(name), **FETCH_OPTIONS)
        except fetcher.FetchError as error:
            raise RuntimeError(f"SD3 needs {name}: {error}") from None
        return str(result.path)

    return load_file_from_url


def _swaps() -> list[AttributeSwap]:
    swaps = [AttributeSwap(sd3_cond_class(), "__init__", _cond_init)]
    modelloader = a1111_module("modules.modelloader")
    if modelloader is not None and hasattr(modelloader, "load_file_from_url"):
        swaps.append(AttributeSwap(modelloader, "load_file_from_url", _load_file_from_url))
    return swaps


# ------------------------------------------------------------------------------------------- attaching
EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "shared.weight")
"""T5's token embedding under both names files use: A1111's T5 reads the first; ComfyUI-made files
(the fp8 one is 4.89 GB: the embedding is stored once) may hold only the second."""


class _LazyFile:
    """A safetensors file as a Mapping that reads one tensor at a time (peak RAM: one tensor)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def items(self):
        keys = list(self.handle.keys())
        for key in keys:
            yield key, self.handle.get_tensor(key)
        wanted, alias = EMBEDDING_KEYS
        if wanted not in keys and alias in keys:
            yield wanted, self.handle.get_tensor(alias)


def build_t5(path: Path, fp8: bool) -> Any:
    """A1111's T5XXLModel built on the meta device, loaded from ``path`` with weights kept in the
    file's dtype (or fp8), so it takes the file's size in memory, not devices.dtype's."""
    import safetensors
    from modules import devices

    t5_class, config = _a1111_t5()
    model = t5_class(config, device="meta", dtype=devices.dtype)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        t5_lib.load_keeping_dtypes(model.transformer, _LazyFile(handle), fp8=fp8)
    left = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if left:
        raise ValueError(f"{path.name} lacks {len(left)} T5 tensors, e.g. {left[:3]}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    _guard_finite(model)
    return model


def _to_device(output: Any, device: Any) -> Any:
    if device is None:
        return output
    if isinstance(output, tuple | list):
        return type(output)(_to_device(item, device) for item in output)
    return output.to(device) if hasattr(output, "to") else output


NAN_HINT = ("Check the T5 file: `python -m lib_sd3 doctor --webui <A1111 folder> --hash` verifies it; delete a bad "
            "one from models/CLIP and it is fetched again. Or set the SD3 setting 'T5-XXL text encoder' (or --sd3-t5) "
            "to off.")
"""What the T5 guard's error says to try: T5 non-finite even in fp32 is a broken file, not fp16 overflow."""


def _guard_finite(model: Any) -> None:
    """Recompute non-finite output wider (:class:`NanGuard`; the infotext notes it), and hand the
    output over on ``devices.device``: with --medvram A1111's hooks do not know this late-attached T5,
    so it may compute on the CPU while CLIP's output, which it is concatenated with, is on the GPU."""
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        target = getattr(a1111_module("modules.devices"), "device", None)
        guard = NanGuard(hint=NAN_HINT, finite=first_finite)  # one per call: its recoveries are this prompt's
        output = guard(original, *args, what="T5", **kwargs)
        if guard.recoveries:
            with _lock:
                STATUS.recomputed += 1
            p = _current_p() if _current_p is not None else None
            if p is not None:
                p.extra_generation_params[INFOTEXT] = \
                    f"{infotext_value()} (recomputed in {guard.recoveries[0].precision.short})"
        return _to_device(output, target)

    model.forward = forward


def _set_t5(cond: Any, model: Any | None, queued: bool = False) -> None:
    """Swap T5 on A1111's SD3Cond (and, on dev, the Sd3T5 wrapper that holds it too).

    ``queued``: take A1111's ``queue_lock`` first, so a swap from our background thread never lands
    in the middle of a generation. Not on the model-load path: A1111 may hold that lock there.
    """
    from modules import shared

    with queue_lock(default=_lock) if queued else _lock:
        cond.t5xxl = model
        if hasattr(cond, "model_t5"):
            cond.model_t5.t5xxl = model
        shared.opts.data["sd3_enable_t5"] = model is not None


def attach(sd_model: Any, name: str, fp8: bool, queued: bool = False) -> None:
    """Load T5 from ``models/CLIP/<name>`` into the loaded SD3 model's text encoders."""
    cond = sd_model.cond_stage_model
    _set_t5(cond, None, queued)  # free the old one first: two T5s at once may not fit
    model = build_t5(clip_dir() / name, fp8)
    reference = getattr(cond, "clip_l", None)
    if reference is not None:
        model.to(next(reference.parameters()).device)
    _set_t5(cond, model, queued)
    mode = "fp8" if fp8 else "fp16"
    with _lock:
        STATUS.mode, STATUS.loaded_file = mode, name
    log.info("T5-XXL on (%s from %s, %.2f GB)", mode, name, t5_lib.parameter_bytes(model) / 1e9)


def refresh(sd_model: Any | None = None, queued: bool = False) -> None:
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
    plan = t5_lib.plan_files(choice.mode, {name for name in (T5_FP16, T5_FP8) if _complete(name)})
    with _lock:
        STATUS.decided_for, STATUS.reason = requested, choice.reason
    log.info("T5: %s", choice.reason)
    want = (plan.load, "fp8" if plan.fp8 else "fp16")
    if plan.load is None:
        if getattr(cond, "t5xxl", None) is not None:
            _set_t5(cond, None, queued)
        with _lock:
            STATUS.mode, STATUS.loaded_file = "off", None
    elif (STATUS.loaded_file, STATUS.mode) != want or getattr(cond, "t5xxl", None) is None:
        try:
            attach(sd_model, plan.load, plan.fp8, queued)
        except Exception as error:  # a bad file must cost T5, never the model
            log.exception("T5 could not be loaded from %s; generating without T5", plan.load)
            _set_t5(cond, None, queued)
            with _lock:
                STATUS.mode, STATUS.loaded_file, STATUS.error = "off", None, f"loading {plan.load}: {error!r}"
    if plan.fetch is not None:
        start_fetch(plan.fetch)


# ---------------------------------------------------------------------------------------------- fetching
def _console_progress(name: str):
    """A tqdm bar in the console, fed by fetch progress reports."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar: dict[str, Any] = {}

    def report(progress: fetcher.Progress) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=progress.total, initial=0, unit="B", unit_scale=True, desc=f"SD3 {name}")
        bar["bar"].update(progress.done - bar["bar"].n)
        if progress.total is not None and progress.done >= progress.total:
            bar["bar"].close()

    return report


def start_fetch(name: str) -> bool:
    """Download ``name`` into models/CLIP in a background thread; False when it cannot start."""
    global _thread
    with _lock:
        if _thread is not None and _thread.is_alive():
            return STATUS.fetching == name
        dest = clip_dir() / name
        if not fetch_allowed():
            STATUS.fetch_state, STATUS.fetching = "offline", None
            STATUS.manual = fetcher.manual_instructions(dest, SOURCES[name], endpoints())
            log.warning("T5 file %s is missing and downloads are off.\n%s", name, STATUS.manual)
            return False
        STATUS.fetch_state, STATUS.fetching, STATUS.error, STATUS.manual, STATUS.progress = \
            "fetching", name, None, None, None
        _cancel.clear()
        _thread = threading.Thread(target=_run_fetch, args=(name, dest), name="sd3-t5-fetch", daemon=True)
        _thread.start()
        return True


def _run_fetch(name: str, dest: Path) -> None:
    console = _console_progress(name)

    def report(progress: fetcher.Progress) -> None:
        with _lock:
            STATUS.progress = {"done": progress.done, "total": progress.total, "fraction": progress.fraction,
                               "rate": progress.rate, "eta": progress.eta, "endpoint": progress.endpoint}
        if console is not None:
            console(progress)

    try:
        fetcher.fetch(SOURCES[name], dest, endpoints=endpoints(), progress=report, cancel=_cancel, **FETCH_OPTIONS)
    except fetcher.FetchError as error:
        with _lock:
            STATUS.fetch_state, STATUS.error, STATUS.manual = "failed", error.reason, error.manual
        log.error("T5 download failed; generating without T5. %s\n%s", error.reason, error.manual)
        return
    except Exception as error:  # a background thread must never take anything down
        with _lock:
            STATUS.fetch_state, STATUS.error = "failed", repr(error)
        log.exception("T5 download failed; generating without T5")
        return
    with _lock:
        STATUS.fetch_state, STATUS.fetching = "done", None
    try:
        refresh(queued=True)  # switch T5 on for the loaded model, text encoders only
    except Exception:
        log.exception("T5 downloaded but could not be switched on")


def wait(timeout: float | None = None) -> bool:
    """Wait for a running fetch (tests, scripts); True when none is running afterwards."""
    thread = _thread
    if thread is not None:
        thread.join(timeout)
    return thread is None or not thread.is_alive()


def cancel() -> None:
    _cancel.set()


# ------------------------------------------------------------------------------------ hooks and routes
def process(p: Any, _args: dict[str, Any]) -> None:
    global _current_p
    if not model_is_sd3(getattr(p, "sd_model", None)):
        return
    if STATUS.decided_for != requested_mode():  # the setting changed since the last decision: apply it now
        refresh(p.sd_model)
    try:
        _current_p = weakref.ref(p)  # the infotext of the generation being encoded, not kept alive by us
    except TypeError:
        _current_p = None
    p.extra_generation_params[INFOTEXT] = infotext_value()


def post_fetch() -> dict[str, Any]:
    """``POST /sd3/t5/fetch``: start (or report) the download the current settings call for."""
    from modules import shared

    if model_is_sd3(getattr(shared, "sd_model", None)):
        refresh(queued=True)
    else:
        ram, vram = t5_lib.free_memory()
        choice = t5_lib.choose_mode(requested_mode(), ram, vram)
        plan = t5_lib.plan_files(choice.mode, {n for n in (T5_FP16, T5_FP8) if _complete(n)})
        if plan.fetch is not None:
            start_fetch(plan.fetch)
    return status()


def add_routes(router: Any) -> None:
    router.add_api_route("/t5", status, methods=["GET"])
    router.add_api_route("/t5/fetch", post_fetch, methods=["POST"])


def _status_markdown() -> str:
    s = status()
    line = f"**T5-XXL:** {infotext_value()} — {s['reason']}"
    if s["fetch_state"] == "failed":
        line += f"\n\nDownload failed: {s['error']}\n\n```\n{s['manual']}\n```"
    return line


def build_ui(is_img2img: bool) -> None:
    import gradio as gr

    tab = "img2img" if is_img2img else "txt2img"
    with gr.Row():
        text = gr.Markdown(_status_markdown(), elem_id=f"sd3_t5_status_{tab}")
        refresh_button = gr.Button("Refresh T5 status", elem_id=f"sd3_t5_refresh_{tab}")
        fetch_button = gr.Button("Download T5 now", elem_id=f"sd3_t5_fetch_{tab}")
    refresh_button.click(fn=_status_markdown, inputs=[], outputs=[text])
    fetch_button.click(fn=lambda: (post_fetch(), _status_markdown())[1], inputs=[], outputs=[text])


REGISTRY.add(Patch.from_swaps("t5.sd3_cond", FEATURE, _detect_cond, _swaps))
hooks.PROCESS.append(process)
hooks.ROUTES.append(add_routes)
hooks.UI.append(build_ui)
hooks.STATUS[FEATURE] = status
hooks.MODEL_LOADED.append(refresh)
