"""T5-XXL in A1111: the user's file or a fetched one, attached without a restart, never fatal.

How A1111 does it (both SD3 states): ``SD3Cond.__init__`` builds a T5 in ``devices.dtype`` when
``opts.sd3_enable_t5`` is on, and its weight loading downloads ``t5xxl_fp16.safetensors`` with
``load_file_from_url`` -- synchronously, without resume or checksum, and a failure there fails the
whole model load (every txt2img then answers HTTP 500). On a CPU it builds T5 in fp32: 19.6 GB.

What we do instead:
- ``SD3Cond.__init__`` runs with ``sd3_enable_t5`` off, so A1111 never builds or downloads T5 (and
  first makes sure the two tokenizers are in the Hub cache, fetched through our mirrors).
- After every model load (``on_model_loaded``, which also covers start-up), when the settings change,
  on ``POST /sd3/t5/fetch`` and after a download, :meth:`T5Feature.refresh` asks the one pure decision
  (:func:`lib_sd3.t5.plan.plan_t5`) what to attach and why, and acts on it: the attachment
  (:mod:`lib_sd3.webui.t5_model`) loads the file, the download (:mod:`lib_sd3.webui.t5_download`)
  fetches what is missing in the background. Any T5-XXL file in models/CLIP or models/text_encoder
  is a candidate, whatever its name (:mod:`lib_sd3.webui.t5_files`); the user's own file wins.
- Generations meanwhile run without T5 and say so in the infotext (``SD3 T5``).
- CLIP-L/G downloads A1111 asks for go through the same fetcher (:mod:`lib_sd3.webui.text_encoder_fetch`).

The state lives in one :class:`T5Feature` built at start-up (:data:`T5`) from a :class:`FetchSetup`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_sd3 import fetch as fetcher
from lib_sd3 import get_logger
from lib_sd3 import t5 as t5_lib
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.t5.plan import T5Plan, plan_t5
from lib_sd3.webui import hooks, settings
from lib_sd3.webui.capabilities import loaded_model, model_is_sd3, sd3_cond_class
from lib_sd3.webui.flags import flag
from lib_sd3.webui.generation import GENERATIONS
from lib_sd3.webui.t5_download import DownloadState, T5Download
from lib_sd3.webui.t5_files import T5Files
from lib_sd3.webui.t5_model import INFOTEXT, T5Attachment, T5Generation, a1111_t5
from lib_sd3.webui.text_encoder_fetch import (
    ClipDownloads,
    FetchSetup,
    default_setup,
    endpoints,
    ensure_tokenizers,
    fetch_allowed,
)

log = get_logger("t5")

FEATURE = "T5-XXL"
OFF_BECAUSE = {DownloadState.FAILED: "off (download failed)", DownloadState.OFFLINE: "off (missing; downloads off)",
               DownloadState.UNUSABLE: "off (T5 file unusable)"}
"""The infotext's ``SD3 T5`` while nothing is attached, by where the download stands."""


def requested_mode() -> str:
    """``--sd3-t5``, else the setting. A pasted infotext may set the setting to what a generation
    recorded (``off (downloading 42%)``, ``fp16 (recomputed in bf16)``): its first word is the mode."""
    value = str(flag("sd3_t5") or settings.get("sd3_t5_mode") or "auto").split(" ", 1)[0]
    return value if value in t5_lib.MODES else "auto"


def picked_file() -> str:
    """The file named in the ``T5-XXL file`` setting; empty: pick one automatically."""
    return str(settings.get("sd3_t5_file") or "").strip()


def _detect_cond() -> str | None:
    cond = sd3_cond_class()
    if cond is None:
        return "no SD3Cond in this A1111 (no SD3 support)"
    if a1111_t5() is None:
        return "SD3Cond found but not T5XXLModel / T5_CONFIG"
    return None


# --------------------------------------------------------------------------------------------- feature
class T5Feature:
    """Everything T5 in the WebUI: it decides (:func:`plan_t5`) and tells the files, the download and the
    attachment what to do; they never call each other."""

    def __init__(self, setup: FetchSetup) -> None:
        self.setup = setup
        self.files = T5Files(setup)
        self.download = T5Download(setup, self.files)
        self.attachment = T5Attachment()
        self.clip = ClipDownloads(setup)
        self.decided_for: tuple[str, str] | None = None  # (mode, picked file) the last decision was made for
        self.plan: T5Plan | None = None
        self.patch = Patch.from_swaps("t5.sd3_cond", FEATURE, _detect_cond, self._swaps)

    def configure(self, setup: FetchSetup) -> None:
        """Take other sources / fetch options from now on (an application embedding the extension,
        or a test bed whose mirror serves its own reduced T5)."""
        self.setup = self.files.setup = self.download.setup = self.clip.setup = setup

    # --- the decision ---------------------------------------------------------------------------------
    def decide(self, sd_model: Any | None = None) -> T5Plan:
        """What to attach and why, for the loaded SD3 model (``sd_model`` None: nothing loaded or not SD3)."""
        ram, vram = t5_lib.free_memory()
        cond = getattr(sd_model, "cond_stage_model", None)
        if getattr(cond, "t5xxl", None) is not None:  # what it holds now is ours to reuse
            freed = t5_lib.parameter_bytes(cond.t5xxl)
            ram, vram = ram + freed, (vram + freed if vram is not None else None)
        return plan_t5(requested_mode(), self.files.candidates(), ram, vram, picked_file(), fetch_allowed())

    def refresh(self, sd_model: Any | None = None, queued: bool = False, asked: bool = False) -> T5Plan | None:
        """Decide, then act: attach what the plan names to the loaded SD3 model and start the download it
        asks for. The one path for model load (start-up included), a changed setting, the fetch route and a
        finished download. ``queued``: from a route or a background thread (see :meth:`T5Attachment.apply`);
        ``asked``: the user asked (the fetch route), so a download may start with no SD3 model loaded.
        Without an SD3 model and unasked, T5 is nobody's concern: nothing is looked at (None)."""
        sd_model = loaded_model() if sd_model is None else sd_model
        sd3 = model_is_sd3(sd_model) and hasattr(sd_model, "cond_stage_model")
        if not sd3 and not asked:
            return None
        plan = self.decide(sd_model if sd3 else None)
        self.decided_for, self.plan = (requested_mode(), picked_file()), plan
        log.info("T5: %s", plan.reason)
        if sd3:
            self.attachment.apply(sd_model, plan, queued)
        if plan.fetch is not None:
            self.download.start(plan.fetch, when_done=self._download_done)
        return plan

    def _download_done(self, name: str, failure: fetcher.FetchError | None) -> None:
        """In the download's thread: switch the fetched file on, or say truly what T5 does without it."""
        if failure is None:
            try:
                self.refresh(queued=True)  # text encoders only
            except Exception:
                log.exception("T5 downloaded but could not be switched on")
            return
        log.error("T5 download of %s failed; %s. %s\n%s", name, self.attachment.describe(), failure.reason,
                  failure.manual)

    def infotext_value(self) -> str:
        """What a generation's ``SD3 T5`` entry says: the precision used, or why T5 was off."""
        mode = self.attachment.mode
        if mode != "off":
            return mode
        state, fraction = self.download.state, self.download.fraction()
        if state == DownloadState.FETCHING:
            return f"off (downloading {fraction:.0%})" if fraction is not None else "off (downloading)"
        return OFF_BECAUSE.get(state, "off")

    # --- status ---------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        attachment, download = self.attachment.status(), self.download.progress()
        out = {**attachment, **download, "error": download["error"] or attachment["error"]}
        checks = self.files.scan()
        plan = self.plan
        out["decided_for"] = self.decided_for[0] if self.decided_for else None
        out["reason"] = plan.reason if plan is not None else "no SD3 model loaded yet"
        out["requested"] = requested_mode()
        out["picked_setting"] = picked_file()
        out["fetch_allowed"] = fetch_allowed()
        out["endpoints"] = endpoints()
        out["files"] = {name: check.usable for name, check in checks.items()}
        out["file_states"] = {name: {"state": check.state, "detail": check.detail, "precision": check.precision}
                              for name, check in checks.items()}
        return out

    # --- A1111 patches --------------------------------------------------------------------------------
    def ensure_tokenizers(self) -> None:
        ensure_tokenizers(self.setup.tokenizer_options)

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

    def _swaps(self) -> list[AttributeSwap]:
        return [AttributeSwap(sd3_cond_class(), "__init__", self._cond_init), *self.clip.swaps()]

    # --- script hooks, routes, UI ---------------------------------------------------------------------
    def process(self, p: Any, _args: dict[str, Any]) -> None:
        if not model_is_sd3(getattr(p, "sd_model", None)):
            return
        if self.decided_for != (requested_mode(), picked_file()):  # a setting changed: apply it now
            self.refresh(p.sd_model)
        value = self.infotext_value()
        p.extra_generation_params[INFOTEXT] = value
        GENERATIONS.of(p).t5 = T5Generation(p.extra_generation_params, value)

    def post_fetch(self) -> dict[str, Any]:
        """``POST /sd3/t5/fetch``: start (or report) the download the current settings call for."""
        self.refresh(queued=True, asked=True)
        return self.status()

    def add_routes(self, router: Any) -> None:
        router.add_api_route("/t5", self.status, methods=["GET"])
        router.add_api_route("/t5/fetch", self.post_fetch, methods=["POST"])

    def status_markdown(self) -> str:
        s = self.status()
        line = f"**T5-XXL:** {self.infotext_value()} — {s['reason']}"
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

    def fetch_offered(self) -> bool:
        """"Download T5 now" only while the settings call for a T5 file that is not here: never while T5 is
        off, nor while a file on disk (the user's own included) serves the requested precision."""
        if requested_mode() == "off" or not fetch_allowed():
            return False
        return self.decide(loaded_model()).fetch is not None

    def build_ui(self, is_img2img: bool) -> None:
        import gradio as gr

        tab = "img2img" if is_img2img else "txt2img"
        text = gr.Markdown(self.status_markdown(), elem_id=f"sd3_t5_status_{tab}")  # full width, above the buttons
        with gr.Row():
            refresh_button = gr.Button("Refresh T5 status", size="sm", elem_id=f"sd3_t5_refresh_{tab}")
            fetch_button = gr.Button("Download T5 now", size="sm", visible=self.fetch_offered(),
                                     elem_id=f"sd3_t5_fetch_{tab}")

        def refreshed() -> tuple[str, Any]:
            return self.status_markdown(), gr.update(visible=self.fetch_offered())

        refresh_button.click(fn=refreshed, inputs=[], outputs=[text, fetch_button])
        fetch_button.click(fn=lambda: (self.post_fetch(), refreshed())[1], inputs=[], outputs=[text, fetch_button])

    def declared(self) -> hooks.Feature:
        """This feature's patch and hooks, registered by start-up."""
        return hooks.Feature(FEATURE, patches=(self.patch,), model_loaded=(self.refresh,),
                             routes=(self.add_routes,), ui=(self.build_ui,), process=(self.process,),
                             status=self.status)


T5 = T5Feature(default_setup())
"""The one T5 feature of this WebUI, built at start-up."""
DECLARED = T5.declared()
