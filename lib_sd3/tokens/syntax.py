"""A1111's prompt syntax without A1111: styles, extra networks, ``AND``, schedules, emphasis.

Inside the WebUI the adapter passes A1111's own parsers in; these are for use without A1111 (the
API on a machine without it, tests, benchmarks). Nothing here raises on a prompt: a half-typed
prompt is the normal case for a counter.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

STEPS_MAX = 1000
"""Upper bound on sampling steps when expanding schedules (alternation yields one text per step)."""


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
"""``\\bAND\\b``, written to start with its literal: Python's ``re`` then jumps to each "AND" (docs/token-counter.md)."""
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
parse to their own text: matched at once instead of group by group (docs/token-counter.md)."""


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

