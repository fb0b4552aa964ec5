"""T5-XXL on the loaded SD3 model: built from a file in A1111's own T5 class, swapped into its text encoders.

A1111 builds T5 in ``devices.dtype`` (fp32 on a CPU: 19.6 GB) inside ``SD3Cond.__init__``. Here A1111's
``T5XXLModel`` is built on the meta device and loaded one tensor at a time with its weights kept in the
file's dtype (or fp8), then set on ``SD3Cond`` (and dev's ``Sd3T5`` wrapper), with ``sd3_enable_t5`` on
exactly while it is there. Only the text encoder changes: no restart, no checkpoint reload.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

from lib_sd3 import get_logger
from lib_sd3 import t5 as t5_lib
from lib_sd3.sampling.nan_guard import NanGuard, first_finite
from lib_sd3.t5.plan import T5Plan
from lib_sd3.webui import settings
from lib_sd3.webui.capabilities import a1111_module, queue_lock
from lib_sd3.webui.generation import GENERATIONS

log = get_logger("t5")

INFOTEXT = settings.BY_KEY["sd3_t5_mode"].infotext
NAN_HINT = ("Check the T5 file: `python -m lib_sd3 doctor --webui <A1111 folder> --hash` verifies it; delete a bad "
            "one from models/CLIP and it is fetched again. Or set the SD3 setting 'T5-XXL text encoder' (or --sd3-t5) "
            "to off.")
"""What the T5 guard's error says to try: T5 non-finite even in fp32 is a broken file, not fp16 overflow."""


# ---------------------------------------------------------------------------------- A1111 shapes used
def a1111_t5() -> tuple[Any, dict] | None:
    """(T5XXLModel, T5_CONFIG) from whichever state this A1111 is in, or None."""
    other = a1111_module("modules.models.sd3.other_impls")
    for name in ("modules.models.sd3.sd3_cond", "modules.models.sd3.sd3_model"):
        module = a1111_module(name)
        if module is not None and hasattr(module, "SD3Cond") and hasattr(module, "T5_CONFIG"):
            if other is not None and hasattr(other, "T5XXLModel"):
                return other.T5XXLModel, module.T5_CONFIG
    return None


def _meta_t5() -> Any:
    from modules import devices

    t5_class, config = a1111_t5()
    return t5_class(config, device="meta", dtype=devices.dtype)


_LAYOUTS: dict[tuple, dict[str, tuple[int, ...]]] = {}  # per T5_CONFIG: building even a meta T5 takes a while


def expected_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the T5 encoder this A1111 builds (its ``T5_CONFIG``), read off a meta model."""
    t5_class, config = a1111_t5()
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


def file_identity(path: Path) -> tuple | None:
    """Changes when the file is replaced (size, mtime, inode): then it is judged and loaded again."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _to_device(output: Any, device: Any) -> Any:
    if device is None:
        return output
    if isinstance(output, tuple | list):
        return type(output)(_to_device(item, device) for item in output)
    return output.to(device) if hasattr(output, "to") else output


# ------------------------------------------------------------------------------------------- attaching
@dataclasses.dataclass
class T5Generation:
    """One generation's ``SD3 T5`` infotext entry; the T5 forward reports recomputations to it."""

    params: dict[str, Any]  # the generation's extra_generation_params
    value: str

    def recomputed_in(self, precision: str) -> None:
        self.params[INFOTEXT] = f"{self.value} (recomputed in {precision})"


class T5Attachment:
    """The T5 on the loaded SD3 model's text encoders: apply a plan, say what is attached."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.mode = "off"  # what is attached now: fp16 | fp8 | off
        self.loaded_file: str | None = None
        self.loaded_identity: tuple | None = None
        self.precision: str | None = None  # the loaded file's own dtype (bf16, fp8 scaled, ...)
        self.error: str | None = None
        self.recomputed = 0  # prompts whose T5 output was non-finite and recomputed

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": self.mode, "loaded_file": self.loaded_file, "precision": self.precision,
                    "error": self.error, "recomputed": self.recomputed}

    def describe(self) -> str:
        """What T5 does now, for console lines that follow an event (a download that failed, ...)."""
        with self._lock:
            if self.mode == "off":
                return "generating without T5"
            return f"T5 stays on ({self.mode} from {self.loaded_file})"

    def forget(self) -> None:
        """A new SD3Cond starts without T5."""
        with self._lock:
            self.mode, self.loaded_file, self.loaded_identity, self.precision = "off", None, None, None

    def apply(self, sd_model: Any, plan: T5Plan, queued: bool = False) -> None:
        """Make the loaded model's T5 what ``plan`` says; loads only when the file, its version or the
        precision changed. ``queued``: from a route or our background thread (take A1111's queue lock);
        not on the model-load path, where A1111 may hold it."""
        cond = sd_model.cond_stage_model
        if plan.load is None:
            if getattr(cond, "t5xxl", None) is not None:
                self._set_t5(cond, None, queued)
            self.forget()
            return
        identity = file_identity(plan.load.path)
        with self._lock:
            same = (self.loaded_file, self.mode, self.loaded_identity) == (plan.load.key, plan.mode, identity)
        if same and getattr(cond, "t5xxl", None) is not None:
            return
        try:
            self._attach(cond, plan, identity, queued)
        except Exception as error:  # a bad file must cost T5, never the model
            log.exception("T5 could not be loaded from %s; generating without T5", plan.load.key)
            self._set_t5(cond, None, queued)
            self.forget()
            with self._lock:
                self.error = f"loading {plan.load.key}: {error!r}"

    def _attach(self, cond: Any, plan: T5Plan, identity: tuple | None, queued: bool) -> None:
        """Load T5 from ``plan.load`` into the loaded SD3 model's text encoders."""
        self._set_t5(cond, None, queued)  # free the old one first: two T5s at once may not fit
        model = build_t5(plan.load.path, plan.fp8)
        self._guard_finite(model)
        reference = getattr(cond, "clip_l", None)
        if reference is not None:
            model.to(next(reference.parameters()).device)
        self._set_t5(cond, model, queued)
        with self._lock:
            self.mode, self.loaded_file, self.loaded_identity = plan.mode, plan.load.key, identity
            self.precision, self.error = plan.load.precision, None
        origin = "the published file" if plan.load.published else "the user's own file"
        log.info("T5-XXL on (%s from %s: %s, %s; %.2f GB)", plan.mode, plan.load.key, plan.load.precision, origin,
                 t5_lib.parameter_bytes(model) / 1e9)

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
                running = GENERATIONS.running()  # the generation being encoded (p.sd3.t5)
                if running is not None and running.t5 is not None:
                    running.t5.recomputed_in(guard.recoveries[0].precision.short)
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
