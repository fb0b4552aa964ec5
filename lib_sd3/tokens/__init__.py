"""Token counts of SD3 prompts, per text encoder, the way A1111 actually encodes them.

SD3 reads a prompt with three encoders: CLIP-L and CLIP-G (one BPE tokenizer, 75-token chunks on
v1.10/dev) and T5-XXL (its own sentencepiece tokens). A1111's counter shows CLIP only, and on
v1.10/dev T5 is silently cut to the CLIP length (``Sd3T5.forward(token_count=...)``), so a long
prompt loses its tail in T5 without the user seeing it. This package computes both counts, the T5
limit of the running A1111 state, and whether T5 is truncated. Nothing here raises on a prompt: a
half-typed prompt is the normal case for a counter.

* :mod:`.syntax` -- A1111's prompt syntax (styles, ``<lora:...>``, ``AND``, schedules, emphasis),
  the same on both A1111 states; inside the WebUI the adapter passes A1111's own parsers instead;
* :mod:`.counting` -- the rules of each A1111 state, and the counts and result types;
* :mod:`.cache` -- token ids per word, tokenized once;
* :mod:`.tokenizers` -- loading CLIP and T5 without downloads, CLIP's vocabulary from open-clip.
"""

from lib_sd3.sd3_state import STATE_DEV, STATE_EARLY
from lib_sd3.tokens.cache import CachedTokenizer, Tokenizers
from lib_sd3.tokens.counting import (
    CLIP_CHUNK,
    CLIP_WINDOW,
    EARLY_CLIP_LIMIT,
    EmbeddingFinder,
    PromptCount,
    Rules,
    TextCount,
    clip_layout,
    clip_target,
    count_prompt,
    count_text,
    embedding_finder,
    fill_chunks,
    safe_attention,
    summarize,
)
from lib_sd3.tokens.syntax import (
    STEPS_MAX,
    Piece,
    apply_styles,
    parse_attention,
    parse_prompt,
    schedule_texts,
    split_and,
    strip_extra_networks,
)
from lib_sd3.tokens.tokenizers import (
    default_tokenizers,
    forget_default_tokenizers,
    load_clip_tokenizer,
    load_t5_tokenizer,
    open_clip_bpe_file,
    write_clip_vocab,
)

__all__ = [
    "CLIP_CHUNK", "CLIP_WINDOW", "EARLY_CLIP_LIMIT", "STATE_DEV", "STATE_EARLY", "STEPS_MAX", "CachedTokenizer",
    "EmbeddingFinder", "Piece", "PromptCount", "Rules", "TextCount", "Tokenizers", "apply_styles", "clip_layout",
    "clip_target", "count_prompt", "count_text", "default_tokenizers", "embedding_finder", "fill_chunks",
    "forget_default_tokenizers", "load_clip_tokenizer", "load_t5_tokenizer", "open_clip_bpe_file",
    "parse_attention", "parse_prompt", "safe_attention", "schedule_texts", "split_and", "strip_extra_networks",
    "summarize", "write_clip_vocab",
]
