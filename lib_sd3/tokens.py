"""Token counts of SD3 prompts, per text encoder, the way A1111 actually encodes them.

SD3 reads a prompt with three encoders: CLIP-L and CLIP-G (one BPE tokenizer, 75-token chunks on
v1.10/dev) and T5-XXL (its own sentencepiece tokens). A1111's counter shows CLIP only, and on
v1.10/dev T5 is silently cut to the CLIP length (``Sd3T5.forward(token_count=...)``), so a long
prompt loses its tail in T5 without the user seeing it. This module computes both counts, the T5
limit of the running A1111 state, and whether T5 is truncated.

What each A1111 state does (read from its code, not guessed):

* **v1.10 / dev** (``sd3_cond.py``): the prompt is split into emphasis pieces (``(word:1.2)``,
  ``[word]``, ``BREAK``) unless the emphasis option is "None"; each piece is tokenized on its own.
  CLIP fills 75-token chunks (BREAK closes one; textual-inversion embeddings take their vector
  count; the comma back-track rule applies only when the model has a comma token, and
  ``Sd3ClipLG`` never sets one). T5 takes the same pieces minus BREAK, adds EOS, and is cut to
  77 x (CLIP chunks) tokens, the chunk count being that of the longest text encoded in the same
  batch (one AND sub-prompt's schedule).
* **early SD3 branch** (34b4443c, sd3-ref ``SD3Tokenizer``): no emphasis parsing at all -- the
  raw text is split on spaces and each word tokenized. CLIP gets one 77-token window; a prompt over
  75 CLIP tokens makes the CLIP embedding add fail (so generation fails). T5 is padded to at least
  77 tokens and never truncated.

Everything before the encoders (styles, ``<lora:...>`` tags, ``AND``, ``[a:b:0.5]`` schedules) is
the same on both states. Inside the WebUI the adapter passes A1111's own parsers in; the small
parsers here are for use without A1111 (the API on a machine without it, tests, benchmarks).

Nothing here raises on a prompt: a half-typed prompt is the normal case for a counter.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import gzip
import importlib.util
import itertools
import json
import math
import re
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lib_sd3 import get_logger

log = get_logger("tokens")

CLIP_CHUNK = 75
"""Prompt tokens per CLIP chunk (A1111 shows N/75, N/150, ...)."""
CLIP_WINDOW = CLIP_CHUNK + 2
"""Tokens per CLIP chunk as encoded: the chunk plus BOS and EOS."""
EARLY_CLIP_LIMIT = CLIP_CHUNK
"""The early branch's single CLIP window: more tokens than this and the CLIP embedding add fails."""
STEPS_MAX = 1000
"""Upper bound on sampling steps when expanding schedules (alternation yields one text per step)."""

STATE_DEV = "v1.10+"
STATE_EARLY = "early-sd3"

CLIP_REPO = "openai/clip-vit-large-patch14"
T5_REPO = "google/t5-v1_1-xxl"
"""Where A1111 loads SD3's tokenizers from (``from_pretrained`` at model load, HF cache)."""


# ----------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Rules:
    """How the running A1111 turns a text into encoder tokens; the adapter fills it from A1111."""

    state: str = STATE_DEV
    parse_emphasis: bool = True  # dev: opts.emphasis != "None"; the early branch never parses
    comma_token: int | None = None  # dev SD3: Sd3ClipLG leaves it None, so no comma back-tracking
    comma_backtrack: int = 20  # opts.comma_padding_backtrack, in tokens
    t5_enabled: bool = True  # T5 model present and opts.sd3_enable_t5 on

    @property
    def early(self) -> bool:
        return self.state == STATE_EARLY


@dataclasses.dataclass(frozen=True)
class TextCount:
    """One text as one encoder call sees it."""

    clip: int  # A1111's token count (full chunks closed early count as 75)
    chunks: int  # CLIP chunks (77 tokens each as encoded)
    t5: int | None  # sentencepiece tokens + EOS; None without a T5 tokenizer


@dataclasses.dataclass(frozen=True)
class PromptCount:
    """The numbers the counter shows for a whole prompt (the worst case over AND and schedules)."""

    clip: int
    clip_target: int
    clip_limit: int | None  # early branch: 75 (longer fails); dev: None (more chunks)
    t5: int | None
    t5_limit: int | None  # dev: 77 x CLIP chunks; early: None (never cut)
    t5_enabled: bool
    state: str = STATE_DEV

    @property
    def t5_truncated(self) -> bool:
        return self.t5 is not None and self.t5_limit is not None and self.t5 > self.t5_limit

    @property
    def clip_over_limit(self) -> bool:
        return self.clip_limit is not None and self.clip > self.clip_limit

    @property
    def t5_state(self) -> str:
        if self.t5 is None:
            return "unavailable"
        if not self.t5_enabled:
            return "disabled"
        return "truncated" if self.t5_truncated else "ok"

    @property
    def notes(self) -> list[str]:
        """Why the counter turns to its warning style, in the user's words; empty when all is well."""
        notes = []
        if self.clip_over_limit:
            notes.append(f"CLIP: {self.clip} tokens; this A1111 build encodes one 75-token window and fails "
                         f"on longer prompts: shorten the prompt or update A1111")
        state = self.t5_state
        if state == "unavailable":
            notes.append("T5: tokenizer not found (google/t5-v1_1-xxl in the Hugging Face cache); T5 not counted")
        elif state == "disabled":
            notes.append("T5 disabled: the prompt reaches CLIP only (enable T5 in Settings and reload the model)")
        elif state == "truncated":
            notes.append(f"T5 truncated: {self.t5} tokens, but A1111 cuts T5 to the CLIP length ({self.t5_limit}); "
                         f"the last {self.t5 - self.t5_limit} are not seen. Add a BREAK to give CLIP another chunk.")
        return notes

    def as_dict(self) -> dict[str, Any]:
        return {
            "clip": {"count": self.clip, "target": self.clip_target, "limit": self.clip_limit,
                     "over_limit": self.clip_over_limit},
            "t5": {"count": self.t5, "limit": self.t5_limit, "truncated": self.t5_truncated,
                   "enabled": self.t5_enabled, "state": self.t5_state},
            "a1111_state": self.state,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------------------------
# Tokenizers: loaded once, each text piece tokenized once


@functools.lru_cache(maxsize=4)
def _split_words(texts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The words of ``texts`` in order, '' where spaces repeat (one ``split`` of them joined), and the distinct
    non-empty ones. Remembered for the next call: CLIP and T5 count the same new texts one after the other."""
    parts = " ".join(texts).split(" ")
    return parts, [w for w in dict.fromkeys(parts) if w]


_LEARNT: weakref.WeakKeyDictionary[Any, tuple] = weakref.WeakKeyDictionary()
"""What :meth:`CachedTokenizer._learnt` found per tokenizer object."""


@dataclasses.dataclass(frozen=True)
class _Spelling:
    """How a Rust tokenizer's tokens spell printable ASCII words: enough to split one encoding of many words.

    Offsets cost the Rust tokenizer about 15% more time than ids alone; for printable ASCII words
    (no normalizer changes them, none is or holds a special token) the token texts tell the words
    apart as well. Sentencepiece (T5) marks the start of each word ("▁a"), so each word begins at
    the one token starting with that mark. Byte-level BPE (CLIP) spells every character and marks
    the end of each pre-token ("a</w>"), so the characters the tokens spell, summed, reach each
    word's end exactly at its last token.
    """

    starts: frozenset[int]  # ids of tokens that start with the word-start mark; empty: spelled lengths instead
    lengths: tuple[int, ...]  # characters each id spells; 0 for special tokens
    specials: str  # first characters of special tokens' texts: text holding one is not split here

    def fits(self, text: str) -> bool:
        return text.isascii() and text.isprintable() and not any(char in text for char in self.specials)

    def bounds(self, ids: list[int], words: list[str]) -> list[int] | None:
        """Where each word's tokens begin in ``ids``, and ``len(ids)``; None if the tokens do not tell."""
        if self.starts:
            starts = self.starts
            bounds = [k for k, i in enumerate(ids) if i in starts]
            if len(bounds) != len(words) or bounds[:1] != [0]:
                return None
            return [*bounds, len(ids)]
        spelled = list(map(self.lengths.__getitem__, ids))
        if not spelled or 0 in spelled:
            return None
        ends = set(itertools.accumulate(map(len, words)))  # characters up to each word's end
        # after a word's last token the spelled characters reach its end; all ends reached: no token straddles
        after = list(itertools.compress(itertools.count(1), map(ends.__contains__, itertools.accumulate(spelled))))
        return [0, *after] if len(after) == len(words) and after[-1] == len(ids) else None


class CachedTokenizer:
    """Token ids (no special tokens) of text pieces, remembered per unit: a word where that is exact.

    CLIP's pre-tokenizer never crosses whitespace and drops it, so a piece's ids are its
    space-separated words' ids joined; transformers 5's T5 tokenizer behaves the same. transformers
    4.30's T5 tokenizer (A1111's) does not -- a trailing space is a token of its own -- so there the
    unit is the whole piece. Which applies is checked once per tokenizer on probe texts. Caching
    units makes a keystroke tokenize one word (or piece) and lets schedule variants and AND
    sub-prompts share the rest. Misses go to the tokenizer in one call. With a Rust tokenizer and
    words as the unit: the words joined by single spaces (less text than the prompt: each word
    once), told apart by what the tokens spell (printable ASCII, :class:`_Spelling`) or else by
    their character offsets. Otherwise: one string with a separator token between the units
    (checked once to give each unit's own ids), about 1.5x the time of the prompt; a batch of many
    short strings costs 2x (Rust) to 10x (transformers 4.30's Python CLIPTokenizer, A1111's) more.
    Each path is checked once per tokenizer on probe words. A lock, as A1111 uses several threads.
    """

    SEPARATOR_CHARS = ("§", "¶", "|", "~")
    """Characters tried as word separators: one that is a single token of its own between spaces."""
    SPACE_PROBES = ("a ", " a", "a  b", " a, b ", "a\nb ", "a \n", "\t a", " ", "  ", "陆 ", "a,b")
    """Texts whose tokens tell whether splitting at spaces changes a tokenizer's output."""
    PROBE_UNITS = ("a", "photo,", "陆", "(red", "1.2)")
    WORD_PROBES = PROBE_UNITS + ("a,b", "a\nb", "\t", "\u3000a", "e\u0301", "\x00")
    """Words (no spaces) on which telling words apart by offsets is checked."""
    ASCII_PROBES = ("a", "photo,", "(red", "1.2)", "a,b", "X's", "[x|y]", "~!@#$%^&*_+=`{}", "\\(\"q\")")
    """Printable ASCII words on which telling words apart by what the tokens spell is checked."""

    def __init__(self, tokenizer: Any, size: int = 16384) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self._ids: dict[str, list[int]] = {}
        self._lengths: dict[str, int] = {}
        self._lock = threading.Lock()
        learnt = self._learnt()
        self.by_words, self._spelling, self._by_offsets, self._separator, self._separator_id = learnt

    def _learnt(self) -> tuple[bool, _Spelling | None, bool, str | None, int | None]:
        """What the probes tell about this tokenizer object, probed on its first wrapping only.

        Probing reads the whole vocabulary (tens of milliseconds for CLIP's); a model load wraps
        the same tokenizers again.
        """
        try:
            return _LEARNT[self.tokenizer]
        except (KeyError, TypeError):  # TypeError: not weakly referenceable or not hashable
            pass
        self.by_words = self._splitting_is_exact()
        self._spelling = self._learn_spelling() if self.by_words else None
        self._by_offsets = self.by_words and self._offsets_split_words()
        self._separator, self._separator_id = self._joined_encoding_separator()
        learnt = self.by_words, self._spelling, self._by_offsets, self._separator, self._separator_id
        try:
            _LEARNT[self.tokenizer] = learnt
        except TypeError:
            pass
        return learnt

    def units(self, text: str) -> list[str]:
        """What a text is cached as: its words where that is exact, else the text itself."""
        if self.by_words:
            return list(filter(None, text.split(" ")))
        return [text] if text else []

    def _splitting_is_exact(self) -> bool:
        try:
            whole = self._call(list(self.SPACE_PROBES))
            for text, ids in zip(self.SPACE_PROBES, whole, strict=True):
                words = [w for w in text.split(" ") if w]
                if ids != [i for part in (self._call(words) if words else []) for i in part]:
                    return False
        except Exception:
            return False
        return True

    def _joined_encoding_separator(self) -> tuple[str | None, int | None]:
        """A joiner whose token marks unit boundaries, checked once on probe units; None if none works.

        For words: first a character that is one token of its own between spaces (as cheap as
        tokenizing the prompt). For whole pieces, or if no character works: the EOS token, a special
        token that splits the text before normalization, so each unit is tokenized as if alone.
        """
        probe = [u for u in (self.PROBE_UNITS if self.by_words else self.PROBE_UNITS + self.SPACE_PROBES) if u.strip()]
        candidates = [f" {c} " for c in self.SEPARATOR_CHARS] if self.by_words else []
        eos, eos_id = getattr(self.tokenizer, "eos_token", None), getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, str) and eos_id is not None:
            candidates.append(eos)
        try:
            alone = self._call(probe)
            for joiner in candidates:
                ids = self._call([joiner.strip()])[0]
                if len(ids) != 1 or ids[0] == getattr(self.tokenizer, "unk_token_id", None):
                    continue
                if self._split(self._run(joiner.join(probe)), ids[0]) == alone:
                    return joiner, ids[0]
        except Exception:
            log.debug("no joined encoding for %s", type(self.tokenizer).__name__, exc_info=True)
        return None, None

    def _learn_spelling(self) -> _Spelling | None:
        """How this tokenizer's tokens spell printable ASCII words (see :class:`_Spelling`); None if not told apart.

        Learnt from the tokens of a lone "a" and checked once on probe words.
        """
        backend = self._backend()
        fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.20: no offsets computed
        added = getattr(backend, "get_added_tokens_decoder", None)
        if fast is None or added is None:
            return None
        try:
            prefix, a, suffix = "".join(map(backend.id_to_token, fast(["a"], add_special_tokens=False)[0].ids)).partition("a")
            if not a or bool(prefix) == bool(suffix) or (prefix and prefix.isascii() and prefix.isprintable()):
                return None
            vocab = backend.get_vocab(with_added_tokens=False)
            special = added()
            lengths = [0] * (max([*vocab.values(), *special]) + 1)
            for token, i in vocab.items():
                lengths[i] = len(token) - len(suffix) if suffix and token.endswith(suffix) else len(token)
            spelling = _Spelling(
                starts=frozenset(i for token, i in vocab.items() if prefix and token.startswith(prefix)),
                lengths=tuple(0 if i in special else n for i, n in enumerate(lengths)),
                specials="".join({token.content[:1] for token in special.values()}),
            )
            probe = list(self.ASCII_PROBES)
            if self._spelled(probe, spelling) == self._call(probe):
                return spelling
        except Exception:
            log.debug("no spelling for %s", type(self.tokenizer).__name__, exc_info=True)
        return None

    def _spelled(self, words: list[str], spelling: _Spelling) -> list[list[int]] | None:
        """Each word's ids from one encoding (no offsets) of the words joined by single spaces; None where unsure."""
        text = " ".join(words)
        backend = self._backend()
        if backend is None or not spelling.fits(text):
            return None
        ids = backend.encode_batch_fast([text], add_special_tokens=False)[0].ids
        bounds = spelling.bounds(ids, words)
        if bounds is None:
            return None
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _offsets_split_words(self) -> bool:
        """Whether :meth:`_spaced` gives each unit its own ids here, checked once on probe units."""
        try:
            return self._spaced(list(self.WORD_PROBES)) == self._call(list(self.WORD_PROBES))
        except Exception:
            log.debug("no offsets for %s", type(self.tokenizer).__name__, exc_info=True)
            return False

    def _spaced(self, words: list[str]) -> list[list[int]] | None:
        """Each word's ids from one encoding of the words joined by single spaces; None without a Rust tokenizer.

        Exact where tokens never cross a space (``by_words``): then every token starts inside its
        word, or on the space before it (where a tokenizer turns that space into a word-start mark),
        so a word's tokens are those starting from one character before it up to the next word's.
        """
        backend = self._backend()
        if backend is None:
            return None
        encoding = backend.encode_batch([" ".join(words)], add_special_tokens=False)[0]
        ids, token_starts = encoding.ids, [start for start, _ in encoding.offsets]
        bounds, start = [], 0
        for word in words:
            bounds.append(bisect.bisect_left(token_starts, start - 1))
            start += len(word) + 1
        bounds.append(len(ids))
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _run(self, text: str) -> list[int]:
        """One text's ids: straight through the Rust tokenizer where there is one and it is idle."""
        backend = self._backend()
        if backend is None:
            return self._call([text])[0]
        fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.20: no offsets computed
        return fast([text], add_special_tokens=False)[0].ids if fast else backend.encode(
            text, add_special_tokens=False).ids

    def _backend(self) -> Any | None:
        """The Rust tokenizer, if it is idle of padding/truncation (A1111 may leave them set on it)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or getattr(backend, "padding", None) or getattr(backend, "truncation", None):
            return None
        return backend

    def _call(self, words: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(words, add_special_tokens=False, truncation=False)["input_ids"]]

    @staticmethod
    def _split(ids: Sequence[int], separator_id: int) -> list[list[int]]:
        ids, out, start = list(ids), [], 0
        while True:
            try:
                end = ids.index(separator_id, start)
            except ValueError:
                out.append(ids[start:])
                return out
            out.append(ids[start:end])
            start = end + 1

    def _encode(self, words: list[str]) -> list[list[int]]:
        """Each unit's ids, in one tokenizer call where possible (units are distinct and non-empty)."""
        found = self._spelled(words, self._spelling) if self._spelling else None
        if found is None and self._by_offsets:
            found = self._spaced(words)
        return found if found is not None else self._joined(words)

    def _joined(self, words: list[str]) -> list[list[int]]:
        """Each unit's ids from one string with a separator token between the units."""
        marker = self._separator.strip() if self._separator else None
        plain = [w for w in words if marker and marker not in w and w.strip()]
        if not plain:
            return self._call(words)
        split = self._split(self._run(self._separator.join(plain)), self._separator_id)
        if len(split) != len(plain):  # a word made the separator's token after all: one call per word
            return self._call(words)
        found = dict(zip(plain, split, strict=True))
        rest = [w for w in words if w not in found]
        if rest:
            found.update(zip(rest, self._call(rest), strict=True))
        return [found[w] for w in words]

    def _words(self, units: Iterable[str]) -> dict[str, list[int]]:
        """The cache, with every non-empty one of ``units`` in it (call with the lock held)."""
        known = self._ids
        missing = [w for w in dict.fromkeys(units) if w and w not in known]
        if missing:
            known.update(zip(missing, self._encode(missing), strict=True))
        return known

    def _trim(self) -> None:
        """Forget the oldest entries beyond ``size`` (after a call has used what it needed)."""
        for cache in (self._ids, self._lengths):
            while len(cache) > self.size:
                del cache[next(iter(cache))]

    def prefetch(self, texts: Iterable[str]) -> None:
        """Count every new text of ``texts``, their new units in one call, so that counting them later hits the cache."""
        self.lengths(list(texts))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        split = [self.units(text) for text in texts]
        with self._lock:
            known = self._words(itertools.chain.from_iterable(split))
            out = [[i for w in words for i in known[w]] for words in split]
            self._trim()
        return out

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Token count per text: all counting needs where no token has to be looked at (cached per text)."""
        with self._lock:
            lengths = self._lengths
            out = list(map(lengths.get, texts))
            if None not in out:  # all counted before (the counts after a prefetch)
                return out
            new = [t for t in dict.fromkeys(texts) if t not in lengths]
            if self.by_words:
                self._count_words(new)
            else:
                known = self._words(new)
                lengths.update((t, len(known[t]) if t else 0) for t in new)
            out = [lengths[t] for t in texts]
            self._trim()
        return out

    def _count_words(self, texts: list[str]) -> None:
        """Count texts made of words: each text's count a difference of running sums over all their words
        (with the lock held)."""
        parts, words = _split_words(tuple(texts))
        known = self._words(words)
        tokens = dict(zip(words, map(len, map(known.__getitem__, words)), strict=True), **{"": 0})
        running = list(itertools.accumulate(map(tokens.__getitem__, parts), initial=0))
        start = 0
        for text in texts:
            end = start + text.count(" ") + 1
            self._lengths[text] = running[end] - running[start]
            start = end

    def vocab_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)


@dataclasses.dataclass
class Tokenizers:
    clip: CachedTokenizer
    t5: CachedTokenizer | None

    @classmethod
    def wrap(cls, clip: Any, t5: Any | None) -> Tokenizers:
        return cls(CachedTokenizer(clip), CachedTokenizer(t5) if t5 is not None else None)


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
        cached = CLIPTokenizer.from_pretrained(CLIP_REPO, local_files_only=True)
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

        cached = T5TokenizerFast.from_pretrained(T5_REPO, local_files_only=True)
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


_DEFAULT: dict[str, Tokenizers | None] = {}
_DEFAULT_LOCK = threading.Lock()


def default_tokenizers() -> Tokenizers | None:
    """The tokenizers for counting outside a loaded SD3 model, loaded on first use and kept (also a miss)."""
    with _DEFAULT_LOCK:
        if "pair" not in _DEFAULT:
            clip = load_clip_tokenizer()
            _DEFAULT["pair"] = Tokenizers.wrap(clip, load_t5_tokenizer()) if clip is not None else None
            if clip is None:
                log.warning("no CLIP tokenizer found (HF cache or open-clip); SD3 token counting is off")
        return _DEFAULT["pair"]


def forget_default_tokenizers() -> None:
    """Look again on next use (after a model load may have put tokenizers into the HF cache)."""
    with _DEFAULT_LOCK:
        _DEFAULT.clear()


# ----------------------------------------------------------------------------------------------
# Prompt syntax without A1111: styles, extra networks, AND, schedules, emphasis


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of prompt text with one emphasis weight; weight -1 with text BREAK is a chunk break."""

    text: str
    weight: float = 1.0

    @property
    def is_break(self) -> bool:
        return self.text == "BREAK" and self.weight == -1


def apply_styles(prompt: str, style_texts: Iterable[str]) -> str:
    """A style with ``{prompt}`` wraps the prompt; any other style is appended after a comma."""
    for style in style_texts:
        if "{prompt}" in style:
            prompt = style.replace("{prompt}", prompt)
        else:
            prompt = ", ".join(part for part in (prompt.strip(), style.strip()) if part)
    return prompt


_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")


def strip_extra_networks(prompt: str) -> str:
    """Drop ``<lora:name:0.8>``-style tags (an unclosed ``<lora:`` stays text, as in A1111)."""
    return _EXTRA_NETWORK.sub("", prompt)


_AND = re.compile(r"AND(?!\w)(?<!\wAND)")
"""``\\bAND\\b``, written to start with its literal: Python's ``re`` then jumps to each "AND" (20x faster)."""
_SUBPROMPT_WEIGHT = re.compile(r":\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")


def split_and(prompt: str) -> list[str]:
    """Sub-prompts of ``a AND b:0.5`` without their weights, each once (composable diffusion)."""
    texts = []
    for sub in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.search(sub)
        texts.append(sub[: match.start()].rstrip() if match else sub.rstrip())
    return list(dict.fromkeys(texts))


# Schedules: a small recursive-descent parser for A1111's grammar of [from:to:when] and [a|b].
# Emphasis brackets are kept as text here (they matter later); they are parsed only so that a
# colon inside "(word:1.2)" is not taken for a schedule's colon.


@dataclasses.dataclass
class _Scheduled:
    before: list
    after: list
    when: str
    step: int = 0


@dataclasses.dataclass
class _Alternate:
    options: list[list]


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_RUN = r"[^\\\[\]():|]*(?:\\.[^\\\[\]():|]*)*"
_TEXT = re.compile(rf"(?:[^\\\[\]():|]+|\\.|\({_RUN}(?::{_RUN})?\)|\[{_RUN}\])+", re.S)
"""Plain text and groups that hold only plain text -- ``(word)``, ``(word:1.2)``, ``[word]`` --, which
parse to their own text: matched at once instead of group by group (3x faster on a typical prompt)."""


class _NoParse(Exception):
    pass


class _ScheduleParser:
    """Packrat parser: a group at a given index parses the same way every time, so each is tried once.

    That keeps a 20,000-character prompt of unbalanced brackets linear; nesting deeper than
    ``MAX_DEPTH`` is treated as text (A1111's own parser gives up on such prompts too).
    """

    MAX_DEPTH = 64

    def __init__(self, text: str) -> None:
        self.s = text
        self.groups: dict[int, tuple[Any, int] | None] = {}
        self.depth = 0

    def seq(self, i: int) -> tuple[list, int]:
        """Text, escapes and well-formed groups up to the first character that ends a sequence."""
        out: list = []
        text = _TEXT if self.depth < self.MAX_DEPTH else _PLAIN  # deeper, a group is text anyway
        while i < len(self.s):
            plain = text.match(self.s, i)
            if plain:
                out.append(plain.group())
                i = plain.end()
                continue
            group = self.group(i) if self.s[i] in "([" else None
            if group is None:
                break
            node, i = group
            out.extend(node) if isinstance(node, list) else out.append(node)
        return out, i

    def group(self, i: int) -> tuple[Any, int] | None:
        if i not in self.groups:
            if self.depth >= self.MAX_DEPTH:
                return None
            self.depth += 1
            try:
                self.groups[i] = self._group(i)
            except _NoParse:
                self.groups[i] = None
            finally:
                self.depth -= 1
        return self.groups[i]

    def _group(self, i: int) -> tuple[Any, int]:
        s = self.s
        first, j = self.seq(i + 1)
        at = s[j] if j < len(s) else ""
        if s[i] == "(":
            if at == ")":
                return ["(", *first, ")"], j + 1
            if at == ":":
                second, k = self.seq(j + 1)
                if k < len(s) and s[k] == ")":
                    return ["(", *first, ":", *second, ")"], k + 1
            raise _NoParse
        if at == "]":
            return ["[", *first, "]"], j + 1
        if at == "|":
            options = [first]
            while j < len(s) and s[j] == "|":
                option, j = self.seq(j + 1)
                options.append(option)
            if j < len(s) and s[j] == "]":
                return _Alternate(options), j + 1
            raise _NoParse
        if at == ":":
            when = _schedule_end(s, j + 1)  # [to:when]
            if when:
                return _Scheduled([], first, when[0]), when[1]
            second, k = self.seq(j + 1)  # [from:to:when]
            if k < len(s) and s[k] == ":":
                when = _schedule_end(s, k + 1)
                if when:
                    return _Scheduled(first, second, when[0]), when[1]
        raise _NoParse

    def tree(self) -> list | None:
        """The prompt as a tree; unbalanced brackets and stray colons at top level stay text; None if unparseable."""
        out: list = []
        i = 0
        while i < len(self.s):
            seq, i = self.seq(i)
            out.extend(seq)
            if i >= len(self.s):
                break
            if self.s[i] in "[]():":
                out.append(self.s[i])
                i += 1
            else:  # "|" outside brackets, or a trailing backslash: A1111 then schedules nothing
                return None
        return out


def _schedule_end(s: str, i: int) -> tuple[str, int] | None:
    """``[ws] NUMBER [ws] ]`` at i: the number's text and the index after the bracket."""
    while i < len(s) and s[i].isspace():
        i += 1
    number = _NUMBER.match(s, i)
    if not number:
        return None
    j = number.end()
    while j < len(s) and s[j].isspace():
        j += 1
    return (number.group(), j + 1) if j < len(s) and s[j] == "]" else None


def _walk(tree: list) -> Iterable[Any]:
    for node in tree:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(tree: list, step: int) -> str:
    parts = []
    for node in tree:
        if isinstance(node, _Scheduled):
            parts.append(_render(node.before if step <= node.step else node.after, step))
        elif isinstance(node, _Alternate):
            parts.append(_render(node.options[(step - 1) % len(node.options)], step))
        else:
            parts.append(node)
    return "".join(parts)


def schedule_texts(prompt: str, steps: int) -> list[str]:
    """The distinct texts a prompt takes over ``steps`` sampling steps (``[a:b:0.5]``, ``[a|b]``)."""
    steps = min(max(int(steps), 1), STEPS_MAX)
    if "[" not in prompt and "|" not in prompt:  # nothing to schedule, nothing to fail on
        return [prompt]
    tree = _ScheduleParser(prompt).tree()
    if tree is None:
        return [prompt]
    switch_steps = {steps}
    nodes = list(_walk(tree))
    for node in nodes:
        if isinstance(node, _Alternate):
            switch_steps.update(range(1, steps + 1))
            continue
        value = float(node.when)
        value = value * steps if "." in node.when else value  # fractions of the steps, or a step number
        node.step = steps if value >= steps else int(value) if value >= 1 else 0
        if node.step >= 1:
            switch_steps.add(node.step)
    choices = {}  # what every switch picks at a step -> the first such step; alternation repeats a lot
    for step in sorted(switch_steps):
        key = tuple(step <= n.step if isinstance(n, _Scheduled) else (step - 1) % len(n.options) for n in nodes)
        choices.setdefault(key, step)
    return list(dict.fromkeys(_render(tree, step) for step in choices.values()))


_ATTENTION = re.compile(r"(\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:)")
"""A1111's emphasis tokens; ``findall`` gives (token, weight or "")."""
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ATTENTION_BRACKETS = re.compile(r"[\\()\[\]]")
EMPHASIS_UP = 1.1
"""What ``(word)`` multiplies attention by; ``[word]`` divides by it."""


def parse_attention(text: str) -> list[Piece]:
    """Split a prompt into runs of equal emphasis weight and BREAK markers (A1111's emphasis syntax).

    Only the piece boundaries matter for counting (each piece is tokenized on its own), but they
    depend on which weights are equal, so weights are computed the way A1111 computes them.
    """
    if "BREAK" not in text and not _ATTENTION_BRACKETS.search(text):  # plain text: one run
        return [Piece(text)]
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for token, weight in _ATTENTION.findall(text):
        if token[0] not in "\\()[]:" and "BREAK" not in token:  # the common case: a run of text
            pieces.append([token, 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif token[0] == "\\":
            pieces.append([token[1:], 1.0])
        elif weight and round_open and _is_float(weight):
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), EMPHASIS_UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS_UP)
        elif "BREAK" not in token:
            pieces.append([token, 1.0])
        else:
            for k, part in enumerate(_BREAK.split(token)):
                if k:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, EMPHASIS_UP)
    for start in square_open:
        scale(start, 1 / EMPHASIS_UP)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [Piece(t, w) for t, w in merged]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_prompt(prompt: str, steps: int = 20, *, is_positive: bool = True,
                 style_texts: Iterable[str] = ()) -> list[list[str]]:
    """Our stand-in for A1111's parse in ``ui.update_token_counter``: texts per sub-prompt schedule."""
    prompt = strip_extra_networks(apply_styles(prompt, style_texts))
    subprompts = split_and(prompt) if is_positive else [prompt]
    return [schedule_texts(sub, steps) for sub in subprompts]


# ----------------------------------------------------------------------------------------------
# Counting

EmbeddingFinder = Callable[[list[int], int], "tuple[int, int] | None"]
"""(token ids, offset) -> (vectors, tokens the name takes) when an embedding's name starts there."""


def embedding_finder(vectors_by_name: Mapping[str, int], clip: CachedTokenizer) -> EmbeddingFinder:
    """Find textual-inversion names in token ids, longest name first (as A1111's embedding database)."""
    names = list(vectors_by_name)
    by_first: dict[int, list[tuple[list[int], int]]] = {}
    for name, ids in zip(names, clip.ids(names), strict=True):
        if ids:
            by_first.setdefault(ids[0], []).append((ids, int(vectors_by_name[name])))
    for entries in by_first.values():
        entries.sort(key=lambda entry: len(entry[0]), reverse=True)

    def find(tokens: list[int], offset: int) -> tuple[int, int] | None:
        for ids, vectors in by_first.get(tokens[offset], ()):
            if tokens[offset : offset + len(ids)] == ids:
                return vectors, len(ids)
        return None

    return find


def clip_layout(pieces: Sequence[Piece], piece_ids: Sequence[list[int]], rules: Rules,
                find_embedding: EmbeddingFinder | None = None) -> tuple[int, int]:
    """A1111's CLIP chunking (``tokenize_line``): (token count as A1111 reports it, number of chunks).

    A chunk closed early (BREAK, comma back-track, an embedding that does not fit) counts as a full
    75; only the last chunk counts what it holds. Only chunk lengths matter, so that is all we track.
    """
    count = chunks = length = 0
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal count, chunks, length, last_comma
        count += length if is_last else CLIP_CHUNK
        chunks += 1
        length, last_comma = 0, -1

    for piece, ids in zip(pieces, piece_ids, strict=True):
        if piece.is_break:
            close()
            continue
        position = 0
        while position < len(ids):
            if ids[position] == rules.comma_token:
                last_comma = length
            elif (rules.comma_backtrack and length == CLIP_CHUNK and last_comma != -1
                  and length - last_comma <= rules.comma_backtrack):
                moved = length - (last_comma + 1)  # the words after the comma go to the next chunk
                close()
                length = moved
            if length == CLIP_CHUNK:
                close()
            found = find_embedding(list(ids), position) if find_embedding else None
            if found is None:
                length += 1
                position += 1
                continue
            vectors, name_tokens = found
            if length + vectors > CLIP_CHUNK:
                close()
            length += vectors
            position += name_tokens
    if length or not chunks:
        close(is_last=True)
    return count, chunks


def fill_chunks(pieces: Sequence[Piece], lengths: Sequence[int]) -> tuple[int, int]:
    """:func:`clip_layout` when no comma rule and no embeddings apply: whole runs of tokens at a time."""
    count = chunks = length = 0
    for piece, n in zip(pieces, lengths, strict=True):
        if piece.is_break:
            count, chunks, length = count + CLIP_CHUNK, chunks + 1, 0
            continue
        while n:
            if length == CLIP_CHUNK:  # a full chunk closes when the next token arrives
                count, chunks, length = count + CLIP_CHUNK, chunks + 1, 0
            take = min(n, CLIP_CHUNK - length)
            length, n = length + take, n - take
    if length or not chunks:
        count, chunks = count + length, chunks + 1
    return count, chunks


def _encoder_pieces(text: str, rules: Rules, attention: Callable[[str], list[Piece]]) -> list[Piece]:
    if rules.early:  # sd3-ref SD3Tokenizer: raw text, one word at a time, no emphasis, no BREAK
        return [Piece(word) for word in text.replace("\n", " ").split(" ") if word]
    return safe_attention(attention, text) if rules.parse_emphasis else [Piece(text)]


def safe_attention(attention: Callable[[str], list[Piece]], text: str) -> list[Piece]:
    """An emphasis parser that raises (A1111's does on ``(a:1.2.3)``) falls back to ours."""
    try:
        return attention(text)
    except Exception:
        return parse_attention(text)


def count_text(text: str, tok: Tokenizers, rules: Rules, *, attention: Callable[[str], list[Piece]] = parse_attention,
               find_embedding: EmbeddingFinder | None = None) -> TextCount:
    """CLIP count and chunks, and T5 tokens (+EOS), of one text as the running A1111 encodes it."""
    return _count_pieces(_encoder_pieces(text, rules, attention), tok, rules, find_embedding)


def _count_pieces(pieces: list[Piece], tok: Tokenizers, rules: Rules,
                  find_embedding: EmbeddingFinder | None) -> TextCount:
    texts = [p.text for p in pieces]
    if rules.early:
        clip, chunks = sum(tok.clip.lengths(texts)), 1
    elif rules.comma_token is None and find_embedding is None:  # no token needs looking at
        clip, chunks = fill_chunks(pieces, tok.clip.lengths(texts))
    else:
        clip, chunks = clip_layout(pieces, tok.clip.ids(texts), rules, find_embedding)
    t5 = None
    if tok.t5 is not None:
        t5 = sum(tok.t5.lengths([p.text for p in pieces if not p.is_break])) + 1
    return TextCount(clip, chunks, t5)


def clip_target(count: int, rules: Rules) -> int:
    """The number after the slash: the early branch has one window; dev rounds up to whole chunks."""
    return EARLY_CLIP_LIMIT if rules.early else math.ceil(max(count, 1) / CLIP_CHUNK) * CLIP_CHUNK


def summarize(schedules: Sequence[Sequence[str]], tok: Tokenizers, rules: Rules, *,
              attention: Callable[[str], list[Piece]] = parse_attention,
              find_embedding: EmbeddingFinder | None = None) -> PromptCount:
    """The counter's numbers for a prompt given as texts per AND sub-prompt (each sub-prompt's schedule).

    CLIP: the largest count over all texts (A1111's counter takes the max). T5: the text with the
    largest overflow past its limit, where on dev a text's limit is 77 x the most CLIP chunks in its
    sub-prompt's schedule, because A1111 encodes one schedule as one batch of equal length.
    """
    schedules = [list(s) for s in schedules if s] or [[""]]
    pieces = {t: _encoder_pieces(t, rules, attention) for s in schedules for t in s}
    words = [p.text for text_pieces in pieces.values() for p in text_pieces]
    tok.clip.prefetch(words)  # one call for every word of every text; the counts below hit the cache
    if tok.t5 is not None:
        tok.t5.prefetch(words)
    counted = {t: _count_pieces(p, tok, rules, find_embedding) for t, p in pieces.items()}
    clip = chunks = 0
    worst: tuple[float, int, int | None] | None = None  # (overflow, t5, limit)
    for texts in schedules:
        counts = [counted[t] for t in texts]
        batch_chunks = max(c.chunks for c in counts)
        clip, chunks = max([clip] + [c.clip for c in counts]), max(chunks, batch_chunks)
        limit = None if rules.early else CLIP_WINDOW * batch_chunks
        for c in counts:
            if c.t5 is not None:
                candidate = (c.t5 - limit if limit is not None else -math.inf, c.t5, limit)
                worst = candidate if worst is None or candidate[:2] > worst[:2] else worst
    return PromptCount(
        clip=clip,
        clip_target=clip_target(clip, rules),
        clip_limit=EARLY_CLIP_LIMIT if rules.early else None,
        t5=worst[1] if worst else None,
        t5_limit=worst[2] if worst else (None if rules.early else CLIP_WINDOW * chunks),
        t5_enabled=rules.t5_enabled,
        state=rules.state,
    )


def count_prompt(prompt: str, tok: Tokenizers, rules: Rules | None = None, *, steps: int = 20, is_positive: bool = True,
                 style_texts: Iterable[str] = (), embeddings: Mapping[str, int] | None = None) -> PromptCount:
    """Everything without A1111: our parsers, then :func:`summarize`."""
    prompt = prompt if isinstance(prompt, str) else ""
    rules = rules or Rules()
    find = embedding_finder(embeddings, tok.clip) if embeddings and not rules.early else None
    schedules = parse_prompt(prompt, steps, is_positive=is_positive, style_texts=style_texts)
    return summarize(schedules, tok, rules, find_embedding=find)
