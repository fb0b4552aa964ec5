"""SD3's two tokenizers as A1111 loads them, found without downloading anything.

CLIP (openai/clip-vit-large-patch14) comes from the Hugging Face cache, else is built from the
BPE file open-clip-torch ships (A1111 installs it); T5 (google/t5-v1_1-xxl) only from the cache.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.fetch.known_files import CLIP_TOKENIZER_REPO, T5_TOKENIZER_REPO
from lib_sd3.tokens.cache import Tokenizers

log = get_logger("tokens")


def open_clip_bpe_file() -> Path | None:
    """CLIP's BPE merges as shipped inside open-clip-torch (A1111 installs it), found without importing it."""
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
            if path.is_file():
                return path
    return None


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order of the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


CLIP_VOCAB = 49408
T5_VOCAB_MIN = 32000
"""Vocabulary sizes that tell a real tokenizer from an empty stand-in (T5-v1.1: 32000 pieces + 100 sentinels)."""
CLIP_MERGES = 49152 - 256 - 2
"""Merges CLIP uses from the BPE file: vocabulary 49408 = 2 x 256 byte symbols + merges + 2 specials."""


def write_clip_vocab(bpe_gz: Path, folder: Path) -> tuple[Path, Path]:
    """Turn CLIP's ``bpe_simple_vocab_16e6.txt.gz`` into the vocab.json / merges.txt of openai's tokenizer.

    The vocabulary is what CLIP builds from that file: the byte symbols, the same with ``</w>``
    (end of word), one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + CLIP_MERGES]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def load_clip_tokenizer() -> Any | None:
    """A1111's CLIP tokenizer from the HF cache, else built from open-clip's bundled BPE; never downloads."""
    from transformers import CLIPTokenizer

    try:
        cached = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_REPO, local_files_only=True)
        if _vocab_size(cached) >= CLIP_VOCAB:
            return cached
    except Exception as error:  # not in the cache (OSError), or a broken cache entry
        log.debug("CLIP tokenizer not in the HF cache: %r", error)
    bpe = open_clip_bpe_file()
    if bpe is None:
        return None
    try:
        folder = Path(tempfile.gettempdir()) / f"sd-webui-sd3-clip-vocab-{bpe.stat().st_size}"
        return CLIPTokenizer(*map(str, write_clip_vocab(bpe, folder)))
    except Exception:
        log.warning("could not build the CLIP tokenizer from %s", bpe, exc_info=True)
        return None


def load_t5_tokenizer() -> Any | None:
    """A1111's T5 tokenizer (google/t5-v1_1-xxl) from the HF cache; never downloads."""
    try:
        from transformers import T5TokenizerFast

        cached = T5TokenizerFast.from_pretrained(T5_TOKENIZER_REPO, local_files_only=True)
    except Exception as error:
        log.debug("T5 tokenizer not in the HF cache: %r", error)
        return None
    return cached if _vocab_size(cached) >= T5_VOCAB_MIN else None


def _vocab_size(tokenizer: Any) -> int:
    """transformers 5 returns an empty tokenizer for a repo missing from the cache instead of raising."""
    try:
        return len(tokenizer.get_vocab())
    except Exception:
        return 0



class DefaultTokenizers:
    """The tokenizers for counting outside a loaded SD3 model: loaded on first use and kept (a miss too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self._pair: Tokenizers | None = None

    def get(self) -> Tokenizers | None:
        with self._lock:
            if not self._loaded:
                clip = load_clip_tokenizer()
                self._pair = Tokenizers.wrap(clip, load_t5_tokenizer()) if clip is not None else None
                self._loaded = True
                if clip is None:
                    log.warning("no CLIP tokenizer found (HF cache or open-clip); SD3 token counting is off")
            return self._pair

    def forget(self) -> None:
        """Look again on next use (after a model load may have put tokenizers into the HF cache)."""
        with self._lock:
            self._loaded, self._pair = False, None


DEFAULT = DefaultTokenizers()
default_tokenizers = DEFAULT.get
forget_default_tokenizers = DEFAULT.forget
