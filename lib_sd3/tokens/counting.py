"""How many tokens each SD3 text encoder gets from a prompt, the way the running A1111 encodes it.

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lib_sd3.sd3_state import STATE_DEV, STATE_EARLY
from lib_sd3.tokens.cache import CachedTokenizer, Tokenizers
from lib_sd3.tokens.syntax import Piece, parse_attention, parse_prompt

CLIP_CHUNK = 75
"""Prompt tokens per CLIP chunk (A1111 shows N/75, N/150, ...)."""
CLIP_WINDOW = CLIP_CHUNK + 2
"""Tokens per CLIP chunk as encoded: the chunk plus BOS and EOS."""
EARLY_CLIP_LIMIT = CLIP_CHUNK
"""The early branch's single CLIP window: more tokens than this and the CLIP embedding add fails."""


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
        """ok, truncated, unavailable (no T5 tokenizer), or disabled: T5 switched off, so nothing of the
        prompt reaches it and neither its count nor its limit is a problem (the page dims it)."""
        if not self.t5_enabled:
            return "disabled"
        if self.t5 is None:
            return "unavailable"
        return "truncated" if self.t5_truncated else "ok"

    @property
    def notes(self) -> list[str]:
        """The counter's tooltip lines in the user's words: why it warns, or that T5 is off; empty when all is well."""
        notes = []
        if self.clip_over_limit:
            notes.append(f"CLIP: {self.clip} tokens; this A1111 build encodes one 75-token window and fails "
                         f"on longer prompts: shorten the prompt or update A1111")
        state = self.t5_state
        if state == "unavailable":
            notes.append("T5: tokenizer not found (google/t5-v1_1-xxl in the Hugging Face cache); T5 not counted")
        elif state == "disabled":
            notes.append("T5 disabled: the prompt reaches CLIP only (turn T5 on in Settings > SD3; the next "
                         "generation uses it)")
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
