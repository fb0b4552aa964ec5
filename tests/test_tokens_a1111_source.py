"""Our counts against A1111's own tokenize code, loaded from an A1111 checkout (opt-in).

Set WEBUI_ROOT (v1.10/dev) and/or WEBUI_ROOT_EARLY (the early SD3 branch, 34b4443c); needs the
``lark`` package A1111's prompt parser uses. Only A1111's pure tokenizing code runs here
(``sd_hijack_clip``, ``sd3_cond``, ``prompt_parser``, the sd3-ref ``SD3Tokenizer``), with the
tokenizers of tests/tiny_tokenizers.py: no model weights, no WebUI start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import types

import pytest
import tiny_tokenizers

from lib_sd3 import tokens as T

pytestmark = pytest.mark.webui

DEV_ROOT = os.environ.get("WEBUI_ROOT")
EARLY_ROOT = os.environ.get("WEBUI_ROOT_EARLY")
HAS_LARK = importlib.util.find_spec("lark") is not None
needs_dev = pytest.mark.skipif(not (DEV_ROOT and HAS_LARK),
                               reason="set WEBUI_ROOT to an A1111 v1.10/dev checkout and install lark")
needs_early = pytest.mark.skipif(not EARLY_ROOT,
                                 reason="set WEBUI_ROOT_EARLY to an A1111 checkout of the early SD3 branch (34b4443c)")


def fuzz_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list(tiny_tokenizers.WORDS) * 3 + [
        " ", ", ", "(", ")", "[", "]", ":", "|", ":1.2)", ":0.5]", " BREAK ", " AND ", "\\(", "陆", "🐱", "\n", ".",
        "\u0301", "\u3000", "\xa0", "\t", "  ", "ﬁ", "Ａ", "é", "İ",
    ]
    prompts = ["", "a cat", tiny_tokenizers.WORDS[0] * 3, " ".join(tiny_tokenizers.WORDS) * 3,
               "(red:1.3) car BREAK [blue] sky, " * 8, "a, " * 90, ("word " * 70 + ", " + "tail " * 12) * 2]
    for _ in range(n):
        prompts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 160))))
    return prompts


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    clip = tiny_tokenizers.clip_tokenizer(tmp_path_factory.mktemp("clip"))
    t5 = tiny_tokenizers.t5_tokenizer(tmp_path_factory.mktemp("t5"))
    return clip, t5


def from_pretrained(tokenizer):
    return types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: tokenizer)


class NoEmbeddings:
    def find_embedding_at_position(self, tokens, offset):
        return None, None


@pytest.fixture
def dev_a1111(fake_webui, tokenizers):
    import torch

    clip, t5 = tokenizers
    fake_webui.shared.opts.data.update(emphasis="Original", comma_padding_backtrack=20, sd3_enable_t5=True)
    fake_webui.module("modules.shared", hf_endpoint="https://huggingface.co", models_path="/nonexistent")
    fake_webui.module("modules.devices", device="cpu", dtype=torch.float32, without_autocast=contextlib.nullcontext)
    fake_webui.module("modules.sd_hijack", model_hijack=types.SimpleNamespace(embedding_db=NoEmbeddings()))
    fake_webui.module("modules.modelloader")
    prompt_parser = fake_webui.load_source(DEV_ROOT, "modules.prompt_parser")
    fake_webui.load_source(DEV_ROOT, "modules.sd_emphasis")
    fake_webui.load_source(DEV_ROOT, "modules.sd_hijack_clip")
    fake_webui.load_source(DEV_ROOT, "modules.models.sd3.other_impls")
    sd3_cond = fake_webui.load_source(DEV_ROOT, "modules.models.sd3.sd3_cond")
    sd3_cond.CLIPTokenizer, sd3_cond.T5TokenizerFast = from_pretrained(clip), from_pretrained(t5)
    return types.SimpleNamespace(lg=sd3_cond.Sd3ClipLG(None, None), t5=sd3_cond.Sd3T5(None),
                                 parser=prompt_parser, tok=T.Tokenizers.wrap(clip, t5))


@needs_dev
def test_dev_text_counts_match_a1111(dev_a1111):
    rules = T.Rules(comma_token=dev_a1111.lg.comma_token)
    assert rules.comma_token is None  # A1111's Sd3ClipLG has no comma token: no back-tracking for SD3
    for text in fuzz_prompts(400):
        chunks, count = dev_a1111.lg.process_texts([text])
        ours = T.count_text(text, dev_a1111.tok, rules, attention=T.parse_attention)
        theirs = (count, len(chunks[0]), len(dev_a1111.t5.tokenize_line(text)[0]))
        assert (ours.clip, ours.chunks, ours.t5) == theirs, text
        full, _ = dev_a1111.t5.tokenize_line(text)
        cut, _ = dev_a1111.t5.tokenize_line(text, target_token_count=77 * len(chunks[0]))
        a1111_truncates = cut[: len(full)] != full  # the whole prompt + EOS no longer fits
        assert a1111_truncates == (ours.t5 > 77 * ours.chunks), text


@needs_dev
def test_dev_comma_backtrack_matches_a1111(dev_a1111, fake_webui):
    comma = dev_a1111.tok.clip.vocab_id(",</w>")
    dev_a1111.lg.comma_token = comma  # as A1111's SD1 CLIP wrapper sets it
    for backtrack in (0, 3, 20, 74):
        fake_webui.shared.opts.data["comma_padding_backtrack"] = backtrack
        rules = T.Rules(comma_token=comma, comma_backtrack=backtrack)
        for text in fuzz_prompts(150, seed=backtrack):
            _, count = dev_a1111.lg.process_texts([text])
            assert T.count_text(text, dev_a1111.tok, rules).clip == count, (backtrack, text)


@needs_dev
def test_dev_whole_prompt_matches_a1111_counter(dev_a1111):
    """ui.update_token_counter's parse (AND, schedules) then the max count, against ours end to end."""
    parser = dev_a1111.parser
    for prompt in fuzz_prompts(200, seed=7):
        for steps in (20, 7):
            _, flat, _ = parser.get_multicond_prompt_list([prompt])
            schedules = parser.get_learned_conditioning_prompt_schedules(flat, steps)
            texts = [text for schedule in schedules for _, text in schedule]
            expected = max(dev_a1111.lg.process_texts([t])[1] for t in texts)
            assert T.count_prompt(prompt, dev_a1111.tok, T.Rules(), steps=steps).clip == expected, prompt
            assert [list(dict.fromkeys(t for _, t in s)) for s in schedules] == T.parse_prompt(prompt, steps)


@needs_early
def test_early_counts_match_sd3_ref_tokenizer(fake_webui, tokenizers):
    clip, t5 = tokenizers
    other_impls = fake_webui.load_source(EARLY_ROOT, "modules.models.sd3.other_impls")
    other_impls.CLIPTokenizer, other_impls.T5TokenizerFast = from_pretrained(clip), from_pretrained(t5)
    sd3_tokenizer = other_impls.SD3Tokenizer()
    tok = T.Tokenizers.wrap(clip, t5)
    rules = T.Rules(state=T.STATE_EARLY)
    for text in fuzz_prompts(300, seed=3):
        out = sd3_tokenizer.tokenize_with_weights(text)
        clip_ids = [t for t, _ in out["g"][0]]  # CLIP-G pads with 0, so the prompt ends at the first EOS
        t5_ids = [t for t, _ in out["t5xxl"][0]]
        ours = T.count_text(text, tok, rules)
        assert ours.clip == clip_ids.index(49407) - 1, text
        assert ours.t5 == t5_ids.index(1) + 1, text  # up to and including EOS; never cut, padded to 77
        assert len(t5_ids) == max(77, ours.t5)


@needs_early
def test_early_clip_fails_past_75_tokens(fake_webui):
    """Why the counter warns on the early branch: sd3-ref's CLIP adds a fixed 77-position embedding."""
    import torch

    other_impls = fake_webui.load_source(EARLY_ROOT, "modules.models.sd3.other_impls")
    config = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
              "hidden_act": "gelu"}
    with torch.no_grad():  # as A1111 builds and runs it
        clip = other_impls.SDClipModel(layer="hidden", layer_idx=-1, textmodel_json_config=config,
                                       dtype=torch.float32)
        assert clip([[49406] + [320] * 75 + [49407]])[0].shape[1] == 77  # 75 prompt tokens + BOS + EOS: fine
        with pytest.raises(RuntimeError, match="size of tensor"):
            clip([[49406] + [320] * 76 + [49407]])  # one more token: the position add fails
