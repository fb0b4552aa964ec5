"""Token ids of prompt text, remembered per word: a keystroke tokenizes the one word that changed.

CLIP's pre-tokenizer never crosses whitespace and drops it, so a text's ids are its
space-separated words' ids joined; transformers 5's T5 tokenizer behaves the same. transformers
4.30's T5 tokenizer (A1111's) does not -- a trailing space is a token of its own -- so there the
unit is the whole text. Which applies is checked once per wrapped tokenizer on a few probe texts.

The cache is a dict unit -> ids. Missing units go to the tokenizer in one call: one string with a
separator token between the units where a separator is found, else a batch of the units. The
joined string is the cheaper one, by far with A1111's Python CLIPTokenizer, whose per-text cost
dominates a batch of short words (figures: docs/token-counter.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from lib_sd3 import get_logger

log = get_logger("tokens")


class CachedTokenizer:
    """Token ids (no special tokens) of texts, from a bounded word -> ids dict and one call per miss batch.

    A lock, as A1111 counts from several threads.
    """

    SEPARATOR_CHARS = ("§", "¶", "|", "~")
    """Characters tried as word separators: one that is a single token of its own between spaces."""
    SPACE_PROBES = ("a ", " a", "a  b", " a, b ", "a\nb ", "a \n", "\t a", " ", "  ", "陆 ", "a,b")
    """Texts whose tokens tell whether splitting at spaces changes a tokenizer's output."""
    PROBE_UNITS = ("a", "photo,", "陆", "(red", "1.2)")
    """Units on which a separator is checked to give each unit its own ids."""

    def __init__(self, tokenizer: Any, size: int = 16384) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self._ids: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self.by_words = self._splitting_is_exact()
        self.separator, self.separator_id = self._joined_encoding_separator()

    # -- what this tokenizer allows, checked once ----------------------------------------------

    def _splitting_is_exact(self) -> bool:
        """Whether a text's ids are always its space-separated words' ids joined."""
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
        """A joiner whose one token marks unit boundaries, checked on probe units; (None, None) if none works.

        For words: a character that is one token of its own between spaces. For whole texts, or if no
        character works: the EOS token, a special token that splits the text before normalization.
        """
        probe = list(self.PROBE_UNITS if self.by_words else self.PROBE_UNITS + self.SPACE_PROBES)
        probe = [u for u in probe if u.strip()]
        candidates = [f" {c} " for c in self.SEPARATOR_CHARS] if self.by_words else []
        eos = getattr(self.tokenizer, "eos_token", None)
        if isinstance(eos, str) and getattr(self.tokenizer, "eos_token_id", None) is not None:
            candidates.append(eos)
        try:
            alone = self._call(probe)
            for joiner in candidates:
                ids = self._call([joiner.strip()])[0]
                if len(ids) != 1 or ids[0] == getattr(self.tokenizer, "unk_token_id", None):
                    continue
                if _split(self._call([joiner.join(probe)])[0], ids[0]) == alone:
                    return joiner, ids[0]
        except Exception:
            log.debug("no joined encoding for %s", type(self.tokenizer).__name__, exc_info=True)
        return None, None

    # -- tokenizing ------------------------------------------------------------------------------

    def _call(self, texts: list[str]) -> list[list[int]]:
        """One tokenizer call; straight to the Rust tokenizer where there is one and A1111 left it idle of
        padding and truncation (transformers' own call costs about as much again on a prompt)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(backend, "padding", None) and not getattr(backend, "truncation", None):
            encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch  # fast: no offsets
            return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]]

    def _encode(self, units: list[str]) -> list[list[int]]:
        """Each unit's ids from one tokenizer call: the units joined by the separator, and apart those that
        hold the separator's text or are blank."""
        marker = self.separator.strip() if self.separator else None
        joined = [u for u in units if marker and u.strip() and marker not in u]
        if not joined:
            return self._call(units)
        inside = set(joined)
        apart = [u for u in units if u not in inside]
        first, *rest = self._call([self.separator.join(joined), *apart])
        split = _split(first, self.separator_id)
        if len(split) != len(joined):  # a unit made the separator's token after all
            return self._call(units)
        found = dict(zip(joined, split, strict=True)) | dict(zip(apart, rest, strict=True))
        return [found[u] for u in units]

    def units(self, text: str) -> list[str]:
        """What a text is cached as: its words where that is exact, else the text itself."""
        if self.by_words:
            return list(filter(None, text.split(" ")))
        return [text] if text else []

    def _known(self, units: list[str]) -> dict[str, list[int]]:
        """The cache, with every one of ``units`` in it (call with the lock held)."""
        known = self._ids
        missing = set(units).difference(known)
        if missing:
            missing_in_order = [u for u in dict.fromkeys(units) if u in missing]
            known.update(zip(missing_in_order, self._encode(missing_in_order), strict=True))
        return known

    def _trim(self) -> None:
        """Forget the oldest entries beyond ``size`` (after a call has used what it needed)."""
        while len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]

    def prefetch(self, texts: Iterable[str]) -> None:
        """Tokenize the new units of all ``texts`` in one call, so that counting them later hits the cache."""
        with self._lock:
            self._known(list(itertools.chain.from_iterable(map(self.units, texts))))

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        split = [self.units(text) for text in texts]
        with self._lock:
            known = self._known(list(itertools.chain.from_iterable(split)))
            out = [list(itertools.chain.from_iterable(map(known.__getitem__, units))) for units in split]
            self._trim()
        return out

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Token count per text: all counting needs where no token has to be looked at."""
        split = [self.units(text) for text in texts]
        with self._lock:
            known = self._known(list(itertools.chain.from_iterable(split)))
            out = [sum(map(len, map(known.__getitem__, units))) for units in split]
            self._trim()
        return out

    def vocab_id(self, token: str) -> int | None:
        return self.tokenizer.get_vocab().get(token)


def _split(ids: list[int], separator_id: int) -> list[list[int]]:
    """``ids`` cut at every ``separator_id`` (which is dropped)."""
    out, start = [], 0
    while True:
        try:
            end = ids.index(separator_id, start)
        except ValueError:
            out.append(ids[start:])
            return out
        out.append(ids[start:end])
        start = end + 1


@dataclasses.dataclass
class Tokenizers:
    clip: CachedTokenizer
    t5: CachedTokenizer | None

    @classmethod
    def wrap(cls, clip: Any, t5: Any | None) -> Tokenizers:
        return cls(CachedTokenizer(clip), CachedTokenizer(t5) if t5 is not None else None)
