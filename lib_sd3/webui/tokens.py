"""The SD3 token counter in the WebUI: A1111's prompt counters show CLIP and T5 for SD3.

A1111 counts a prompt in ``ui.update_token_counter``: it runs the ``before_token_counter``
callbacks, parses styles / extra networks / AND / schedules, calls
``model_hijack.get_prompt_lengths(text)`` per text and returns
``f"<span ...>{token_count}/{max_length}</span>"``. On the early SD3 branch that call raises
(``SD3Cond`` has no ``process_texts``); on dev it counts CLIP only.

This module, while an SD3 model is loaded:

* replaces ``StableDiffusionModelHijack.get_prompt_lengths`` (sd3_only patch; it still hands any
  non-SD3 model to A1111's original) with one that counts with :mod:`lib_sd3.tokens`, using the
  tokenizers A1111 already loaded with the model and A1111's own emphasis parser;
* computes the whole prompt's T5 numbers in ``before_token_counter`` (same thread, just before)
  with A1111's own parsers, and hands them to the page inside A1111's own response: the target
  number is an ``int`` that formats as ``75<span class="sd3-tokens" hidden data-...>``, which
  javascript/sd3_token_counter.js turns into ``23/75 · T5 31/77``. No extra request per keystroke;
* serves ``POST /sd3/token-count`` with the same numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import html
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from lib_sd3 import get_logger
from lib_sd3 import tokens as lib
from lib_sd3.fetch.known_files import CLIP_TOKENIZER_REPO
from lib_sd3.patching import AttributeSwap, Patch
from lib_sd3.webui import hooks, settings
from lib_sd3.webui.capabilities import STATE_DEV, STATE_EARLY, a1111_option, a1111_state, loaded_model, model_is_sd3

log = get_logger("tokens")

FEATURE = "token counter"
PATCH_NAME = "tokens.get_prompt_lengths"
PROMPT_MAX_CHARS = 200_000
"""Longest prompt the route accepts; longer is a 422, not minutes of tokenizing."""


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, exc_info=True)


_WARNED: set[str] = set()


# -- what the running A1111 has -----------------------------------------------------------------


_MODEL_TOKENIZERS: dict[tuple[int, int], lib.Tokenizers] = {}


def tokenizers(model: Any | None) -> lib.Tokenizers | None:
    """The tokenizers A1111 loaded with the SD3 model (both states keep the sd3-ref ``SD3Tokenizer``
    on ``SD3Cond.tokenizer``; dev also on ``model_lg`` / ``model_t5``), else ones from the HF cache.
    Wrapped once per tokenizer pair so their piece caches live as long as the model."""
    cond = getattr(model, "cond_stage_model", None)
    ref = getattr(cond, "tokenizer", None)
    clip = (getattr(getattr(ref, "clip_l", None), "tokenizer", None)
            or getattr(getattr(cond, "model_lg", None), "tokenizer", None))
    t5 = (getattr(getattr(ref, "t5xxl", None), "tokenizer", None)
          or getattr(getattr(cond, "model_t5", None), "tokenizer", None))
    if clip is None or t5 is None:
        default = lib.default_tokenizers()
        clip = clip if clip is not None else (default.clip.tokenizer if default else None)
        t5 = t5 if t5 is not None else (default.t5.tokenizer if default and default.t5 else None)
    if clip is None:
        return None
    key = (id(clip), id(t5))
    if key not in _MODEL_TOKENIZERS:
        _MODEL_TOKENIZERS.clear()
        _MODEL_TOKENIZERS[key] = lib.Tokenizers.wrap(clip, t5)
    return _MODEL_TOKENIZERS[key]


_STATE: dict[str, str] = {}


def encoder_state() -> str:
    """Early branch or dev, decided once per model load (a failed import is not cached by Python)."""
    if "state" not in _STATE:
        from lib_sd3.webui import early_long_prompts as long_prompts  # on the early branch it may encode as dev does

        early = a1111_state() == STATE_EARLY and not long_prompts.chunks_like_dev()
        _STATE["state"] = STATE_EARLY if early else STATE_DEV
    return _STATE["state"]


def rules(model: Any | None) -> lib.Rules:
    """How this A1111 encodes SD3 text, read from its options and the loaded model."""
    cond = getattr(model, "cond_stage_model", None) if model_is_sd3(model) else None
    t5_option = bool(a1111_option("sd3_enable_t5", True))
    return lib.Rules(
        state=encoder_state(),
        parse_emphasis=a1111_option("emphasis", "Original") != "None",
        comma_token=getattr(getattr(cond, "model_lg", None), "comma_token", None),
        comma_backtrack=int(a1111_option("comma_padding_backtrack", 20) or 0),
        t5_enabled=t5_option and (cond is None or bool(getattr(cond, "t5xxl", None))),
    )


def attention(text: str) -> list[lib.Piece]:
    """A1111's own emphasis parser (ours if it is missing or raises, e.g. on ``(a:1.2.3)``)."""
    from modules import prompt_parser

    return [lib.Piece(str(t), float(w)) for t, w in prompt_parser.parse_prompt_attention(text)]


def embedding_finder(state_rules: lib.Rules) -> lib.EmbeddingFinder | None:
    """A1111's textual-inversion lookup; only dev's SD3 CLIP uses embeddings."""
    if state_rules.early:
        return None
    try:
        from modules.sd_hijack import model_hijack

        find = model_hijack.embedding_db.find_embedding_at_position
    except Exception:
        return None

    def found(tokens: list[int], offset: int) -> tuple[int, int] | None:
        embedding, length = find(tokens, offset)
        return None if embedding is None else (int(embedding.vectors), int(length))

    return found


def schedules(prompt: str, steps: int, styles: list[str], is_positive: bool) -> list[list[str]]:
    """The texts A1111's counter counts, per AND sub-prompt, parsed by A1111 (as ui.update_token_counter).

    Like A1111: styles when "Count tokens of enabled styles" is on, then extra networks, AND (positive
    only), schedules; a parse error while typing counts the text as it is. Ours when A1111's are missing.
    """
    steps = min(max(int(steps or 1), 1), lib.STEPS_MAX)
    try:
        from modules import extra_networks, prompt_parser, shared
    except Exception:
        return lib.parse_prompt(prompt, steps, is_positive=is_positive)
    text = prompt
    if styles and a1111_option("include_styles_into_token_counters", True):
        try:
            store = shared.prompt_styles
            apply = store.apply_styles_to_prompt if is_positive else store.apply_negative_styles_to_prompt
            text = apply(text, styles)
        except Exception:
            _warn_once("styles", "token counter: could not apply styles; counting without them")
    try:
        text, _ = extra_networks.parse_prompt(text)
        flat = prompt_parser.get_multicond_prompt_list([text])[1] if is_positive else [text]
        parsed = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
    except Exception:  # half-typed syntax, as A1111 does
        parsed = [[[steps, text]]]
    return [list(dict.fromkeys(str(t) for _, t in schedule)) for schedule in parsed]


def count(prompt: str, steps: int = 20, styles: list[str] | None = None, is_positive: bool = True,
          model: Any | None = None, tok: lib.Tokenizers | None = None) -> lib.PromptCount | None:
    """The whole prompt's numbers as the counter shows them; None without any CLIP tokenizer."""
    model = loaded_model() if model is None else model
    tok = tok or tokenizers(model)
    if tok is None:
        return None
    state_rules = rules(model)
    return lib.summarize(schedules(prompt or "", steps, list(styles or []), is_positive), tok, state_rules,
                         attention=attention, find_embedding=embedding_finder(state_rules))


# -- A1111's counter ----------------------------------------------------------------------------


class CounterTarget(int):
    """The number after the slash, carrying the SD3 numbers to the page.

    ``ui.update_token_counter`` writes ``f"{token_count}/{max_length}"`` into its HTML; formatting
    this int appends a hidden span whose data attributes javascript/sd3_token_counter.js reads. Maths,
    comparisons and ``str()`` stay those of the plain int, so other callers see a number.
    """

    summary: lib.PromptCount

    def __new__(cls, value: int, summary: lib.PromptCount) -> CounterTarget:
        target = super().__new__(cls, value)
        target.summary = summary
        return target

    def __format__(self, spec: str) -> str:
        text = int.__format__(self, spec)
        return text + info_html(self.summary) if not spec else text


def info_html(c: lib.PromptCount) -> str:
    data = {
        "clip": c.clip, "clip-target": c.clip_target, "clip-state": "over" if c.clip_over_limit else "ok",
        "t5": "" if c.t5 is None else c.t5, "t5-limit": "" if c.t5_limit is None else c.t5_limit,
        "t5-state": c.t5_state, "a1111-state": c.state, "notes": "\n".join(c.notes),
    }
    attributes = " ".join(f'data-{key}="{html.escape(str(value), quote=True)}"' for key, value in data.items())
    return f'<span class="sd3-tokens" hidden {attributes}></span>'


@dataclasses.dataclass(frozen=True)
class _Pending:
    texts: frozenset[str]
    summary: lib.PromptCount


_LOCAL = threading.local()


def before_token_counter(params: Any) -> None:
    """Count the whole prompt once, just before A1111 asks per text (same thread, same call)."""
    _LOCAL.pending = None
    try:
        model = loaded_model()
        if not (model_is_sd3(model) and settings.get("sd3_token_counter")):
            return
        parsed = schedules(params.prompt, params.steps, list(params.styles or []), params.is_positive)
        tok, state_rules = tokenizers(model), rules(model)
        if tok is None:
            return
        summary = lib.summarize(parsed, tok, state_rules, attention=attention,
                                find_embedding=embedding_finder(state_rules))
        _LOCAL.pending = _Pending(frozenset(t for texts in parsed for t in texts), summary)
    except Exception:  # the counter must never put a traceback into the console per keystroke
        _warn_once("before", "SD3 token counter: counting the whole prompt failed; counting per text")


def sd3_prompt_lengths(text: str, model: Any) -> tuple[int, int]:
    tok, state_rules = tokenizers(model), rules(model)
    if tok is None:
        return 0, lib.CLIP_CHUNK
    find = embedding_finder(state_rules)
    one = lib.count_text(text, tok, state_rules, attention=attention, find_embedding=find)
    target = lib.clip_target(one.clip, state_rules)
    if not settings.get("sd3_token_counter"):
        return one.clip, target
    pending = getattr(_LOCAL, "pending", None)
    summary = (pending.summary if pending is not None and text in pending.texts
               else lib.summarize([[text]], tok, state_rules, attention=attention, find_embedding=find))
    return one.clip, CounterTarget(target, summary)


def patched_get_prompt_lengths(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_prompt_lengths(self: Any, text: str, *args: Any, **kwargs: Any) -> Any:
        model = loaded_model()
        if not model_is_sd3(model):
            return original(self, text, *args, **kwargs)
        try:
            return sd3_prompt_lengths(text, model)
        except Exception:
            _warn_once("lengths", "SD3 token counter failed; showing 0 (see the traceback above, once)")
            return 0, lib.CLIP_CHUNK

    get_prompt_lengths.__name__ = getattr(original, "__name__", "get_prompt_lengths")
    get_prompt_lengths.__doc__ = getattr(original, "__doc__", None)
    return get_prompt_lengths


def _hijack_class() -> Any:
    from modules import sd_hijack

    return sd_hijack.StableDiffusionModelHijack


def detect() -> str | None:
    try:
        cls = _hijack_class()
    except Exception as error:
        return f"modules.sd_hijack.StableDiffusionModelHijack not found ({error!r})"
    return None if callable(getattr(cls, "get_prompt_lengths", None)) else "get_prompt_lengths not found"


# -- HTTP ---------------------------------------------------------------------------------------


class TokenCountRequest(BaseModel):
    prompt: str = Field("", max_length=PROMPT_MAX_CHARS)
    negative: str | None = Field(None, max_length=PROMPT_MAX_CHARS)
    steps: int = Field(20, ge=1, le=lib.STEPS_MAX)
    styles: list[str] = Field(default_factory=list)


def api_tokenizers(model: Any | None) -> lib.Tokenizers | None:
    """Our own tokenizer instances for the API: API calls are not queued behind generation as the UI
    counter is, and a Rust tokenizer used by two threads at once can fail the other one."""
    own = lib.default_tokenizers()
    return own if own is not None and own.t5 is not None else tokenizers(model)


def token_count(request: TokenCountRequest) -> dict[str, Any]:
    """Both prompts' CLIP and T5 numbers, as the counters show them (SD3 rules even if SD3 is not loaded)."""
    from fastapi import HTTPException

    model = loaded_model()
    tok = api_tokenizers(model)
    prompt = count(request.prompt, request.steps, request.styles, True, model, tok)
    if prompt is None:
        raise HTTPException(status_code=503, detail="no CLIP tokenizer: load an SD3 model once (A1111 fetches "
                            f"{CLIP_TOKENIZER_REPO}) or install open-clip-torch")
    negative = count(request.negative, request.steps, request.styles, False, model, tok) \
        if request.negative is not None else None
    return {
        "model_is_sd3": model_is_sd3(model),
        "steps": request.steps,
        "prompt": prompt.as_dict(),
        "negative": negative.as_dict() if negative is not None else None,
    }


def add_routes(router: Any) -> None:
    router.add_api_route("/token-count", token_count, methods=["POST"])


def register_callbacks(script_callbacks: Any) -> None:
    if hasattr(script_callbacks, "on_before_token_counter"):
        script_callbacks.on_before_token_counter(before_token_counter, name="sd3 token counter")


def on_model_loaded(_model: Any) -> None:
    """A new model brings new tokenizers, and may have put them into the HF cache."""
    _MODEL_TOKENIZERS.clear()
    _STATE.clear()
    lib.forget_default_tokenizers()


def status() -> dict[str, Any]:
    tok = next(iter(_MODEL_TOKENIZERS.values()), None)
    return {"tokenizers_loaded": tok is not None, "t5_tokenizer": bool(tok and tok.t5)}


PATCH = Patch.from_swaps(
    PATCH_NAME, FEATURE, detect,
    lambda: [AttributeSwap(_hijack_class(), "get_prompt_lengths", patched_get_prompt_lengths)],
    sd3_only=True,
)
DECLARED = hooks.Feature(FEATURE, patches=(PATCH,), install=(register_callbacks,), model_loaded=(on_model_loaded,),
                         routes=(add_routes,), status=status)
