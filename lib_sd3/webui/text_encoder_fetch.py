"""SD3's text-encoder files and tokenizers through our downloader, and the settings every download obeys.

A1111 fetches ``clip_l`` / ``clip_g`` with ``modelloader.load_file_from_url`` when an SD3 model loads (no
resume, no checksum, one endpoint; a failure fails the model load) and the two tokenizers with
``from_pretrained`` (online whenever the Hub cache lacks them). Here both go through :mod:`lib_sd3.fetch`
(mirrors, resume, sha256): :class:`ClipDownloads` swaps A1111's downloader for those two files only, and
:func:`ensure_tokenizers` fills the Hub cache before A1111 asks, so model load works offline afterwards.
The T5 download (:mod:`lib_sd3.webui.t5_download`) uses the same settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lib_sd3 import fetch as fetcher
from lib_sd3 import get_logger
from lib_sd3.fetch.known_files import CLIP_G, CLIP_L, T5_FP8, T5_FP16, TOKENIZER_REPOS, KnownFile, sources
from lib_sd3.patching import AttributeSwap
from lib_sd3.webui import settings
from lib_sd3.webui.capabilities import a1111_module
from lib_sd3.webui.flags import flag

log = get_logger("text_encoders")


@dataclasses.dataclass(frozen=True)
class FetchSetup:
    """What the text-encoder downloads are built with: where each file comes from and how to fetch it.

    ``fetch_options`` holds the patience (timeouts, back-off, give-up bound); endpoints, offline,
    progress and cancel are filled per download from the current settings.
    """

    sources: Mapping[str, tuple[KnownFile, ...]]
    fetch_options: fetcher.FetchOptions = fetcher.FetchOptions()
    tokenizer_options: fetcher.FetchOptions = fetcher.FetchOptions(max_attempts=1, backoff=0.0, timeout=(5.0, 15.0),
                                                                   give_up_s=30.0)  # at model load: fail fast


def default_setup() -> FetchSetup:
    return FetchSetup({name: sources(name) for name in (T5_FP16, T5_FP8, CLIP_L, CLIP_G)})


# --------------------------------------------------------------------------------------- configuration
def fetch_allowed() -> bool:
    return bool(settings.get("sd3_fetch")) and not flag("sd3_no_fetch") and not fetcher.is_offline()


def endpoints() -> list[str]:
    return fetcher.endpoints_in_order(flag("sd3_mirror"), settings.get("sd3_mirrors"))


def models_dir() -> Path:
    from modules import shared

    return Path(shared.models_path)


def clip_dir() -> Path:
    """Where A1111 keeps (and downloads) the text encoders."""
    return models_dir() / "CLIP"


def fetch_options(base: fetcher.FetchOptions, **per_call: Any) -> fetcher.FetchOptions:
    """``base`` with this moment's endpoints and offline state (settings may change at any time)."""
    return dataclasses.replace(base, endpoints=tuple(endpoints()), offline=not fetch_allowed(), **per_call)


def console_progress(name: str) -> Callable[[fetcher.Progress], None] | None:
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


# ------------------------------------------------------------------------------------------ tokenizers
def ensure_tokenizers(options: fetcher.FetchOptions) -> None:
    """Put the CLIP and T5 tokenizers into the Hub cache before A1111 asks for them; never raises."""
    for repo in TOKENIZER_REPOS:
        try:
            fetcher.fetch_tokenizer(repo, fetch_options(options))
        except fetcher.FetchError as error:
            log.warning("tokenizer %s not cached: %s", repo, error)
        except Exception:
            log.exception("fetching tokenizer %s failed", repo)


# ------------------------------------------------------------------------------------------- CLIP-L/G
class ClipDownloads:
    """A1111's ``load_file_from_url`` for clip_l / clip_g through our fetcher; anything else as before."""

    def __init__(self, setup: FetchSetup) -> None:
        self.setup = setup

    def swaps(self) -> list[AttributeSwap]:
        modelloader = a1111_module("modules.modelloader")
        if modelloader is None or not hasattr(modelloader, "load_file_from_url"):
            return []
        return [AttributeSwap(modelloader, "load_file_from_url", self._load_file_from_url)]

    def _load_file_from_url(self, original: Callable[..., str]) -> Callable[..., str]:
        def load_file_from_url(url: str, *args: Any, model_dir: str | None = None, file_name: str | None = None,
                               **kwargs: Any) -> str:
            name = file_name or os.path.basename(url.split("?")[0])
            if model_dir is None or name not in (CLIP_L, CLIP_G) or "/resolve/" not in url:
                return original(url, *args, model_dir=model_dir, file_name=file_name, **kwargs)
            return str(self.fetch(name, Path(model_dir)))

        return load_file_from_url

    def fetch(self, name: str, folder: Path) -> Path:
        """``folder/name``: the user's file as it is (as A1111 does), else downloaded and verified."""
        known = self.setup.sources[name]
        dest = folder / name
        if dest.is_file():  # as A1111 does: a file the user put there is theirs to choose
            if known[0].size not in (None, dest.stat().st_size):
                log.warning("%s is %d bytes, not the known %d: using it anyway", dest, dest.stat().st_size,
                            known[0].size)
            return dest
        try:
            return fetcher.fetch(known, dest, fetch_options(self.setup.fetch_options,
                                                            progress=console_progress(name))).path
        except fetcher.FetchError as error:
            raise RuntimeError(f"SD3 needs {name}: {error}") from None
