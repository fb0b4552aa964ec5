"""Long prompts on A1111's early SD3 branch (34b4443c), encoded the way dev encodes them.

The early ``SD3Cond.forward`` hands each prompt to the sd3-ref ``SD3Tokenizer``: CLIP gets one
window padded to 77 but never cut, so a prompt over 75 CLIP tokens fails in CLIP's position
embedding (HTTP 500), and ``BREAK`` / ``(emphasis:1.2)`` are plain words. Dev (``sd3_cond.py``)
runs CLIP-L/G through A1111's chunking text model (75 tokens a chunk, BREAK, emphasis, the
``Emphasis`` option) and gives T5 the same prompt padded or cut to 77 x the CLIP chunk count.

Where ``SD3Cond`` cannot chunk (no ``get_token_count``: the early branch), this patch replaces its
``forward`` with dev's encoding, built from the early branch's own pieces: its CLIP-L/G and T5
models, the tokenizers it loaded, and its ``FrozenCLIPEmbedderWithCustomWordsBase`` (dev's
``TextConditionalModel`` under its older name). The output keeps the early shape (one
``{'crossattn', 'vector'}`` dict per prompt) that the early ``prompt_parser`` expects. The token
counter then counts with dev's rules (:func:`chunks_like_dev`), so it shows dev's numbers.
"""

from __future__ import annotations

import weakref
from typing import Any

from lib_sd3 import get_logger
from lib_sd3.patching import AttributeSwap, NotNeeded, Patch
from lib_sd3.webui import hooks, infotext
from lib_sd3.webui.capabilities import a1111_module, sd3_cond_class

log = get_logger("long_prompts")

FEATURE = "long prompts (early SD3 branch)"
PATCH_NAME = "early.long_prompts"
CLIP_WIDTH = 4096
"""CLIP-L (768) + CLIP-G (1280) features, zero-padded to T5's width, as both states do."""
CHUNK_BASES = ("TextConditionalModel", "FrozenCLIPEmbedderWithCustomWordsBase")
"""A1111's chunking text model in ``modules.sd_hijack_clip``: dev's name, then the early branch's."""


def chunk_base() -> type | None:
    """A1111's chunking text model class (75-token chunks, BREAK, emphasis), or None."""
    module = a1111_module("modules.sd_hijack_clip")
    for name in CHUNK_BASES:
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    return None


def detect() -> str | None:
    """Applied only where SD3Cond cannot chunk a prompt itself (dev's has ``get_token_count``)."""
    cond = sd3_cond_class()
    if cond is None:
        return "no SD3Cond in this A1111 (no SD3 support)"
    if hasattr(cond, "get_token_count"):
        return NotNeeded("not needed: this A1111's SD3Cond chunks long prompts itself")
    if chunk_base() is None:
        return f"modules.sd_hijack_clip has none of {', '.join(CHUNK_BASES)}"
    return None


def chunks_like_dev() -> bool:
    """True while this patch encodes prompts as dev does: the token counter then uses dev's rules."""
    return PATCH.state.value == "applied"


class _Pooled:
    """The ``wrapped`` model the early chunking base asks about: SD3's CLIP returns a pooled vector."""

    return_pooled = True


def make_clip_lg(base: type, hijack: Any) -> type:
    """Dev's ``Sd3ClipLG`` on top of ``base``; the encoders are held outside torch's module tree,
    so the SD3Cond's ``state_dict`` and ``.to()`` see them once, where A1111 put them."""

    class ClipLG(base):
        def __init__(self, clip_l: Any, clip_g: Any, tokenizer: Any) -> None:
            if base.__name__ == "TextConditionalModel":
                super().__init__()
                self.return_pooled = True
            else:
                super().__init__(_Pooled(), hijack)
            self.encoders = (clip_l, clip_g)
            self.tokenizer = tokenizer
            empty = tokenizer("")["input_ids"]
            self.id_start, self.id_end, self.id_pad = empty[0], empty[1], empty[1]
            self.comma_token = None  # as dev's Sd3ClipLG: no comma back-tracking

        def tokenize(self, texts: list[str]) -> list[list[int]]:
            return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

        def encode_with_transformers(self, tokens: Any) -> Any:
            import torch

            clip_l, clip_g = self.encoders
            tokens_g = tokens.clone()
            for row in range(tokens_g.shape[0]):  # CLIP-G pads with 0 after the first end token
                end = tokens_g[row].cpu().tolist().index(self.id_end)
                tokens_g[row, end + 1:] = 0
            l_out, l_pooled = clip_l(tokens)
            g_out, g_pooled = clip_g(tokens_g)
            lg_out = torch.cat([l_out, g_out], dim=-1)
            lg_out = torch.nn.functional.pad(lg_out, (0, CLIP_WIDTH - lg_out.shape[-1]))
            lg_out.pooled = torch.cat((l_pooled, g_pooled), dim=-1)
            return lg_out

        def encode_embedding_init_text(self, init_text: str, nvpt: int) -> Any:
            import torch

            return torch.zeros((nvpt, 768 + 1280))

    return ClipLG


def t5_ids(tokenizer: Any, text: str, parse: Any | None) -> list[int]:
    """Dev's ``Sd3T5.tokenize_line`` before its cut: emphasis text without weights, BREAK dropped, EOS."""
    pieces = parse(text) if parse is not None else [[text, 1.0]]
    ids = tokenizer([piece for piece, _ in pieces], truncation=False, add_special_tokens=False)["input_ids"]
    tokens: list[int] = []
    for piece_ids, (piece, weight) in zip(ids, pieces, strict=True):
        if piece == "BREAK" and weight == -1:
            continue
        tokens += piece_ids
    return tokens + [t5_specials(tokenizer)[0]]


def t5_specials(tokenizer: Any) -> tuple[int, int]:
    """(end, pad) as dev reads them: ``tokenizer('', padding='max_length', max_length=2)``."""
    end, pad = tokenizer("", padding="max_length", max_length=2)["input_ids"][:2]
    return end, pad


def pad_or_cut(tokens: list[int], target: int, pad: int) -> list[int]:
    return (tokens + [pad] * (target - len(tokens)))[:target]


def t5_tokens(tokenizer: Any, text: str, target: int, parse: Any | None) -> list[int]:
    """Dev's ``Sd3T5.tokenize_line``: :func:`t5_ids` padded or cut to ``target`` (77 per CLIP chunk)."""
    return pad_or_cut(t5_ids(tokenizer, text, parse), target, t5_specials(tokenizer)[1])


WARNED_TEXTS = 256
"""Prompts remembered as already warned about (the console says a cut once per prompt)."""


class EarlyEncoder:
    """Dev's SD3 text encoding for one early ``SD3Cond``, built from its own models and tokenizers."""

    def __init__(self, cond: Any, clip_lg_class: type) -> None:
        ref = cond.tokenizer  # sd3-ref SD3Tokenizer: the CLIP and T5 tokenizers A1111 loaded
        self.cond = weakref.proxy(cond)
        self.clip_lg = clip_lg_class(cond.clip_l, cond.clip_g, ref.clip_l.tokenizer)
        self.t5_tokenizer = ref.t5xxl.tokenizer
        self.warned: set[str] = set()

    def __call__(self, prompts: list[str]) -> list[dict[str, Any]]:
        import torch
        from modules import devices, prompt_parser, shared

        lg_out, vector = self.clip_lg(prompts)
        count = lg_out.shape[1]
        t5 = getattr(self.cond, "t5xxl", None)  # read per call: the T5 feature attaches and detaches it
        if t5 is not None and getattr(shared.opts, "sd3_enable_t5", False):
            parse = prompt_parser.parse_prompt_attention if getattr(shared.opts, "emphasis", "Original") != "None" \
                else None
            t5_out, _ = t5([self.t5_tokens(text, count, parse) for text in prompts])
        else:
            t5_out = torch.zeros((len(prompts), count, CLIP_WIDTH))
        lgt = torch.cat([lg_out.to(devices.device), t5_out.to(device=devices.device, dtype=lg_out.dtype)], dim=-2)
        vector = vector.to(devices.device)
        return [{"crossattn": lgt[i], "vector": vector[i]} for i in range(len(prompts))]

    def t5_tokens(self, text: str, count: int, parse: Any | None) -> list[int]:
        """T5's tokens for ``text`` as dev makes them; a cut is said once in the console and in the infotext."""
        from modules import sd_hijack

        ids = t5_ids(self.t5_tokenizer, text, parse)
        whole = len(ids)
        if whole > count:
            note = f"{count} of {whole} tokens (77 per CLIP chunk, as on dev; BREAK adds a chunk)"
            sd_hijack.model_hijack.extra_generation_params[infotext.T5_CUT] = note
            if text not in self.warned:
                if len(self.warned) > WARNED_TEXTS:
                    self.warned.clear()
                self.warned.add(text)
                log.warning("T5 gets %s", note)
        return pad_or_cut(ids, count, t5_specials(self.t5_tokenizer)[1])


class Encoders:
    """One :class:`EarlyEncoder` per SD3Cond instance, dropped with it."""

    def __init__(self) -> None:
        self._by_cond: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def for_cond(self, cond: Any) -> EarlyEncoder:
        encoder = self._by_cond.get(cond)
        if encoder is None:
            from modules import sd_hijack

            encoder = EarlyEncoder(cond, make_clip_lg(chunk_base(), sd_hijack.model_hijack))
            self._by_cond[cond] = encoder
        return encoder


ENCODERS = Encoders()


def make_forward(original: Any) -> Any:
    def forward(self: Any, prompts: list[str]) -> Any:
        return ENCODERS.for_cond(self)(list(prompts))

    return forward


def swaps() -> list[AttributeSwap]:
    return [AttributeSwap(sd3_cond_class(), "forward", make_forward)]


PATCH = Patch.from_swaps(PATCH_NAME, FEATURE, detect, swaps)
DECLARED = hooks.Feature(FEATURE, patches=(PATCH,))
