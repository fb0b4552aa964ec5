"""SD3 token counts against independent oracles.

CLIP: open-clip-torch's own SimpleTokenizer (a separate BPE implementation over the same file).
T5: the sentencepiece processor itself (our counts go through transformers' T5TokenizerFast).
Expected numbers are built from those oracles and from A1111's documented rules (75-token chunks,
BREAK closes a chunk, T5 + EOS cut to 77 x chunks on dev), not from our own code.
"""

from __future__ import annotations

import math
import time

import pytest

from lib_sd3 import tokens as T

DEV = T.Rules()
EARLY = T.Rules(state=T.STATE_EARLY)
KANGAROO = ('A portrait photo of a kangaroo wearing an orange hoodie and blue sunglasses standing on the grass in front '
            'of the Sydney Opera House holding a sign on the chest that says "WUJIE"!')


@pytest.fixture(scope="session")
def clip_oracle():
    """open_clip's SimpleTokenizer: number of BPE tokens of a text, no BOS/EOS."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    return lambda text: len(simple.encode(text))


@pytest.fixture(scope="session")
def t5_oracle(t5_tokenizer):
    """sentencepiece's own encoder on the same model file: pieces of a text, no EOS."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=t5_tokenizer.vocab_file) if getattr(
        t5_tokenizer, "vocab_file", None) else None
    if processor is None:
        pytest.skip("T5 tokenizer has no vocab_file")
    return lambda text: len(processor.encode(text))


@pytest.fixture
def tok(clip_tokenizer, t5_tokenizer):
    return T.Tokenizers.wrap(clip_tokenizer, t5_tokenizer)


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


# -- the tokenizers themselves -----------------------------------------------------------------


@pytest.mark.parametrize("text", [
    'a green sign that says "Very Deep learning" and is at the edge of the Grand Canyon', KANGAROO,
    KANGAROO.replace("WUJIE", "陆"), "emoji 🐱👍 test", "Café naïve ÉCOLE", "a,b, c", "(word:1.2) [x] don't",
])
def test_clip_vocab_derived_from_open_clip_matches_its_tokenizer(clip_tokenizer, text):
    from open_clip.tokenizer import SimpleTokenizer

    ours = clip_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == SimpleTokenizer().encode(text)
    assert clip_tokenizer("")["input_ids"] == [49406, 49407]  # <|startoftext|>, <|endoftext|>
    assert len(clip_tokenizer.get_vocab()) == 49408


def test_t5_tokenizer_matches_sentencepiece(t5_tokenizer, t5_oracle):
    for text in (KANGAROO, "陆", "🐱 emoji", "", "(x:1.2), y"):
        assert len(t5_tokenizer(text, add_special_tokens=False)["input_ids"]) == t5_oracle(text)
    assert t5_tokenizer("", padding="max_length", max_length=2)["input_ids"] == [1, 0]  # EOS, pad as in T5


def test_real_t5_tokenizer_if_cached(clip_tokenizer):
    real = T.load_t5_tokenizer()
    if real is None:
        pytest.skip("google/t5-v1_1-xxl tokenizer not in the Hugging Face cache")
    tok = T.Tokenizers.wrap(clip_tokenizer, real)
    result = T.count_prompt(KANGAROO, tok, DEV)
    assert result.t5 == len(real(KANGAROO)["input_ids"])  # real T5 appends EOS itself
    assert result.t5_limit == 77


# -- plain prompts, chunks, BREAK --------------------------------------------------------------


@pytest.mark.parametrize("rules", [DEV, EARLY], ids=["dev", "early"])
def test_plain_prompt(tok, clip_oracle, t5_oracle, rules):
    result = T.count_prompt(KANGAROO, tok, rules)
    assert result.clip == clip_oracle(KANGAROO)
    assert result.clip_target == 75
    assert result.t5 == t5_oracle(KANGAROO) + 1  # + EOS
    assert result.t5_limit == (77 if rules is DEV else None)


def test_long_prompt_takes_more_chunks_on_dev(tok, clip_oracle, t5_oracle):
    text = words(160)
    n = clip_oracle(text)
    result = T.count_prompt(text, tok, DEV)
    assert (result.clip, result.clip_target) == (n, math.ceil(n / 75) * 75)
    assert result.t5_limit == 77 * math.ceil(n / 75)
    assert result.t5 == t5_oracle(text) + 1
    assert result.t5_truncated == (result.t5 > result.t5_limit)


def test_break_closes_a_chunk(tok, clip_oracle, t5_oracle):
    result = T.count_prompt("a red car BREAK a blue sky", tok, DEV)
    assert result.clip == 75 + clip_oracle("a blue sky")
    assert result.clip_target == 150
    assert result.t5 == t5_oracle("a red car") + t5_oracle("a blue sky") + 1  # BREAK is not sent to T5
    assert result.t5_limit == 154
    trailing = T.count_prompt("a red car BREAK", tok, DEV)
    assert (trailing.clip, trailing.clip_target, trailing.t5_limit) == (75, 75, 77)


def test_early_branch_reads_syntax_literally(tok, clip_oracle, t5_oracle):
    text = "(red:1.3) car BREAK [blue] sky"
    result = T.count_prompt(text, tok, EARLY)
    assert result.clip == clip_oracle(text)
    assert result.t5 == t5_oracle(text) + 1
    assert result.clip_target == 75 and result.t5_limit is None and not result.t5_truncated


def test_early_branch_over_75_clip_tokens_is_flagged(tok, clip_oracle):
    result = T.count_prompt(words(80), tok, EARLY)
    assert result.clip == clip_oracle(words(80)) > 75
    assert result.clip_over_limit and result.clip_target == 75
    assert any("75" in note for note in result.notes)


# -- A1111 prompt syntax -----------------------------------------------------------------------


def test_emphasis_weights_are_stripped(tok, clip_oracle, t5_tokenizer):
    result = T.count_prompt("((red:1.3) car), [blue] sky, \\(literal\\)", tok, DEV)
    assert result.clip == clip_oracle("red car, blue sky, (literal)")
    # T5 tokenizes each emphasis run on its own (transformers 4.30's T5 makes a trailing space a token)
    runs = ["red", " car", ", ", "blue", " sky, (literal)"]  # "\\(" is text: it joins the run of weight 1
    assert result.t5 == sum(len(t5_tokenizer(run, add_special_tokens=False)["input_ids"]) for run in runs) + 1


def test_emphasis_off_sends_the_text_as_is(tok, clip_oracle):
    result = T.count_prompt("(red:1.3) car BREAK x", tok, T.Rules(parse_emphasis=False))
    assert result.clip == clip_oracle("(red:1.3) car BREAK x")


def test_extra_networks_removed_unclosed_tag_kept(tok, clip_oracle):
    assert T.count_prompt("<lora:detail:0.8> a cat <hypernet:x:1>", tok).clip == clip_oracle("a cat")
    assert T.count_prompt("a cat <lora:detail", tok).clip == clip_oracle("a cat <lora:detail")


def test_and_takes_the_longest_subprompt(tok, clip_oracle, t5_oracle):
    long = "a dog with a very long tail and many words"
    result = T.count_prompt(f"a cat AND {long}:0.5 AND x :1.2", tok, DEV)
    assert result.clip == clip_oracle(long)
    assert result.t5 == t5_oracle(long) + 1
    negative = T.count_prompt(f"a cat AND {long}:0.5", tok, DEV, is_positive=False)
    assert negative.clip == clip_oracle(f"a cat AND {long}:0.5")  # no AND in the negative prompt


def test_schedule_takes_the_longest_text(tok, clip_oracle):
    result = T.count_prompt("a [cat:dog with a very long tail:0.5] here", tok, DEV, steps=20)
    assert result.clip == clip_oracle("a dog with a very long tail here")
    # [x:y:0.01] at 20 steps switches at step int(0.2) = 0: only "y" is ever encoded
    assert T.count_prompt("[a b c d e f:y:0.01]", tok, DEV, steps=20).clip == clip_oracle("y")
    assert T.count_prompt("[a b c d e f:y:0.5]", tok, DEV, steps=20).clip == clip_oracle("a b c d e f")


def test_t5_limit_comes_from_the_schedule_batch(tok, clip_oracle, t5_oracle):
    """Dev encodes a sub-prompt's schedule as one batch: the short text gets the long one's chunks."""
    long = words(100)
    result = T.count_prompt(f"[short words:{long}:0.5]", tok, DEV)
    chunks = math.ceil(clip_oracle(long) / 75)
    assert result.t5_limit == 77 * chunks
    assert result.t5 == t5_oracle(long) + 1


def test_styles_like_a1111(tok, clip_oracle):
    styled = T.apply_styles("a cat", ["{prompt}, masterpiece", "best quality"])
    assert styled == "a cat, masterpiece, best quality"
    assert T.count_prompt("a cat", tok, style_texts=["{prompt}, masterpiece"]).clip == clip_oracle("a cat, masterpiece")


def test_textual_inversion_counts_its_vectors(tok, clip_oracle):
    result = T.count_prompt("a photo of myemb here", tok, DEV, embeddings={"myemb": 8})
    assert result.clip == clip_oracle("a photo of here") + 8
    # an embedding that does not fit into the chunk starts the next one; the closed chunk counts 75
    spill = T.count_prompt(words(70) + " myemb", tok, DEV, embeddings={"myemb": 8})
    assert spill.clip == 75 + 8


def test_comma_backtrack_rule(tok):
    """70 one-token words, a comma, 10 more: the 10 move to the next chunk when back-tracking is on."""
    text = words(70, "a") + ", " + words(10, "b")
    comma = tok.clip.vocab_id(",</w>")
    on = T.count_prompt(text, tok, T.Rules(comma_token=comma, comma_backtrack=20))
    assert on.clip == 75 + 10
    short_window = T.count_prompt(text, tok, T.Rules(comma_token=comma, comma_backtrack=3))
    assert short_window.clip == 81
    assert T.count_prompt(text, tok, DEV).clip == 81  # SD3 on dev: Sd3ClipLG has no comma token


# -- T5 state ----------------------------------------------------------------------------------


def test_t5_truncation_reported(tok, t5_oracle):
    text = words(60, "kangaroo")  # 60 CLIP tokens, one chunk; many more T5 pieces with the small model
    result = T.count_prompt(text, tok, DEV)
    assert result.t5 == t5_oracle(text) + 1 > 77
    assert result.t5_truncated and result.t5_state == "truncated"
    assert f"{result.t5 - 77}" in result.notes[0]
    assert T.count_prompt(text, tok, EARLY).t5_truncated is False  # the early branch never cuts T5


def test_t5_disabled_and_unavailable(tok, clip_tokenizer):
    disabled = T.count_prompt("a cat", tok, T.Rules(t5_enabled=False))
    assert disabled.t5_state == "disabled" and "disabled" in disabled.notes[0]
    unavailable = T.count_prompt("a cat", T.Tokenizers.wrap(clip_tokenizer, None), DEV)
    assert unavailable.t5 is None and unavailable.t5_state == "unavailable"
    assert unavailable.as_dict()["t5"]["count"] is None


def test_t5_off_is_not_a_warning_whatever_its_count(tok, clip_tokenizer):
    """T5 switched off: nothing reaches it, so past its limit or without a tokenizer it is "disabled", no more."""
    long = T.count_prompt(words(200), tok, T.Rules(t5_enabled=False))
    assert long.t5_truncated and long.t5_state == "disabled"
    assert [n for n in long.notes if "truncated" in n] == []
    no_tokenizer = T.count_prompt("a cat", T.Tokenizers.wrap(clip_tokenizer, None), T.Rules(t5_enabled=False))
    assert no_tokenizer.t5_state == "disabled" and no_tokenizer.as_dict()["t5"]["state"] == "disabled"


# -- bad input ---------------------------------------------------------------------------------

BAD = {
    "empty": "",
    "20k": ("a very long prompt, (with:1.2) [some] [syntax:other:0.3] <lora:x:1> " * 300)[:20000],
    "cjk": "a sign that says 陆",
    "emoji": "🐱👍🏽🇯🇵 cat",
    "control": "a\x00b\x01\x07\x1b[31m cat\r\n\t",
    "open round": "((((a cat",
    "open square": "[[[a cat:",
    "close only": "a cat)))]]]",
    "open lora": "a cat <lora:foo",
    "and weights": "a AND b:1e5 AND :0.5 AND AND c:-1",
    "odd schedule": "[a:b:1e400] [c:d:-1e400] [e:f:.] [g:h:1.2.3] [::0.5] [a|b|] [|]",
    "bad weight": "(a:1.2.3) (b:.) (c:-)",
    "backslash": "a\\",
    "pipe": "a | b",
    "only break": "BREAK",
    "deep": "(" * 5000 + "x" + ")" * 5000,
}


@pytest.mark.parametrize("rules", [DEV, EARLY], ids=["dev", "early"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gives_a_count(tok, name, rules):
    started = time.perf_counter()
    result = T.count_prompt(BAD[name], tok, rules, steps=30)
    assert isinstance(result.clip, int) and result.clip >= 0
    assert isinstance(result.t5, int) and result.t5 >= 1
    assert result.clip_target >= 75
    assert set(result.as_dict()) == {"clip", "t5", "a1111_state", "notes"}
    assert time.perf_counter() - started < 5


def test_empty_prompt(tok):
    result = T.count_prompt("", tok, DEV)
    assert (result.clip, result.clip_target, result.t5, result.t5_limit) == (0, 75, 1, 77)


# -- our parsers, against A1111's documented examples ------------------------------------------


@pytest.mark.parametrize(("prompt", "expected"), [
    ("test", ["test"]),
    ("a [b:3]", ["a ", "a b"]),
    ("a [b: 3]", ["a ", "a b"]),
    ("a [[[b]]:2]", ["a ", "a [[b]]"]),
    ("[(a:2):3]", ["", "(a:2)"]),
    ("a [b : c : 1] d", ["a b  d", "a  c  d"]),
    ("a[b:[c:d:2]:1]e", ["abe", "ace", "ade"]),
    ("a [unbalanced", ["a [unbalanced"]),
    ("a [b:.5] c", ["a  c", "a b c"]),
    ("((a][:b:c [d:3]", ["((a][:b:c ", "((a][:b:c d"]),
    ("[a|(b:1.1)]", ["a", "(b:1.1)"]),
    ("[fe|]male", ["female", "male"]),
    ("x | y [a:b:3]", ["x | y [a:b:3]"]),  # "|" outside brackets: A1111 schedules nothing
])
def test_schedule_texts(prompt, expected):
    assert T.schedule_texts(prompt, 10) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a:1.5) [b]", [("a", 1.5), (" ", 1.0), ("b", 1 / 1.1)]),
])
def test_parse_attention(text, expected):
    got = [(p.text, p.weight) for p in T.parse_attention(text)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_split_and():
    assert T.split_and("a cat AND a dog:0.5 AND a dog :2") == ["a cat", " a dog"]
    assert T.split_and("ANDROID AND x") == ["ANDROID", " x"]


# -- loading once, tokenizing each piece once --------------------------------------------------


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def __call__(self, texts, **kwargs):
        self.texts.extend(texts)
        return self.inner(texts, **kwargs)

    def get_vocab(self):
        return self.inner.get_vocab()


def test_each_word_is_tokenized_once(clip_tokenizer, t5_tokenizer):
    clip = CountingTokenizer(clip_tokenizer)
    tok = T.Tokenizers.wrap(clip, t5_tokenizer)
    assert tok.clip.by_words  # CLIP: whitespace never matters, so words are the unit

    def tokenized():
        separator = tok.clip.separator
        words = sorted(w for text in clip.texts for w in (text.split(separator) if separator else [text]))
        clip.texts.clear()
        return words

    tokenized()  # the probes made once when wrapping
    T.count_prompt("a (red:1.2) car, [blue] sky AND a car", tok)
    assert tokenized() == sorted(["a", "red", "car,", "blue", "sky", "car"])
    T.count_prompt("a (red:1.2) car, [blue] sky AND a car", tok)
    assert tokenized() == []
    T.count_prompt("a (red:1.2) car, [blue] sky! AND a car", tok)  # one keystroke: only the changed word
    assert tokenized() == ["sky!"]


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_joined_encoding_equals_word_by_word(clip_tokenizer, t5_tokenizer, which):
    """One call on words joined by a separator token gives each word's own ids (the fast path)."""
    import random

    tokenizer = clip_tokenizer if which == "clip" else t5_tokenizer
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        pytest.skip("a Python tokenizer (transformers < 5 CLIP): words are tokenized one by one")
    cached = T.CachedTokenizer(tokenizer)
    assert cached.separator is not None  # the fast path is in use with these tokenizers
    rng = random.Random(5)
    alphabet = list("abcXYZ,.!?()[]:;'\"-_/\\@#$%^&*+=~`|§") + ["陆", "🐱", "é", "İ", "ß", "\u0301", "\x00", "\x07",
                                                               "\t", "\n", "\u3000", "ｌ", "ﬁ", "</s>", "<|endoftext|>"]
    for _ in range(300):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(10)]
        words = [w for w in dict.fromkeys(words) if w.strip(" ") and " " not in w]
        expected = [list(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
        assert cached._encode(words) == expected, words


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_joined_encoding_equals_word_by_word_on_mixed_words(clip_tokenizer, t5_tokenizer, which):
    """Tokenizing many words in one call gives each word its own ids, as tokenizing it alone does: printable
    ASCII batches, and batches with odd characters and special tokens' texts (those go apart in the same call)."""
    import random

    tokenizer = clip_tokenizer if which == "clip" else t5_tokenizer
    cached = T.CachedTokenizer(tokenizer)
    assert cached.separator is not None
    rng = random.Random(11)
    plain = list("abcdefXYZ0189,.!?()[]:;'\"-_/\\@#$%^&*+=~`|{}") + ["'s", "'ll", "WUJIE", "photo,"]
    odd = ["<", "</s>", "<|endoftext|>", "陆", "é", "\u0301", "\u3000", "\t", "\n", "\x00", "ﬁ", "▁", "</w>"]
    for round_ in range(400):
        alphabet = plain + (odd if round_ % 2 else [])
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(12)]
        words = [w for w in dict.fromkeys(words) if w.strip(" ") and " " not in w]
        expected = [list(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
        assert cached._encode(words) == expected, words


def test_joined_encoding_counts_like_one_batched_call(clip_tokenizer, t5_tokenizer):
    """Whole counts, cold and warm, with the separator join equal those with one batched call of the words."""
    prompts = [
        KANGAROO + ", (masterpiece:1.2) [a:b:0.5] [x|y] BREAK more words AND a second sub-prompt:0.6, (z:0.8)",
        KANGAROO.replace("WUJIE", "陆") + " [café|naïve] (🐱:1.1) AND ÉCOLE",
        "a  double  space, trailing ,  (unbalanced [x:y:3] \\(escaped\\) <lora:x:1>",
    ]
    joined = T.Tokenizers.wrap(clip_tokenizer, t5_tokenizer)
    batched = T.Tokenizers.wrap(clip_tokenizer, t5_tokenizer)
    for cached in (batched.clip, batched.t5):
        cached.separator = cached.separator_id = None
    for rules in (DEV, EARLY, T.Rules(comma_token=clip_tokenizer.get_vocab()[",</w>"])):
        for prompt in prompts:
            for _ in range(2):  # cold, then warm
                assert T.count_prompt(prompt, joined, rules) == T.count_prompt(prompt, batched, rules), prompt


def test_probes_run_once_per_tokenizer(clip_tokenizer):
    """Probing happens when a tokenizer is wrapped (once per model load), never while counting."""
    counting = CountingTokenizer(clip_tokenizer)
    first = T.CachedTokenizer(counting)
    assert counting.texts  # probed on wrapping
    counting.texts.clear()
    first.lengths(["a cat"])
    first.lengths(["a cat", "a"])
    assert counting.texts == [first.separator.join(["a", "cat"])]  # the two new words, in one call
    second = T.CachedTokenizer(counting)
    assert (second.by_words, second.separator) == (first.by_words, first.separator)


def test_default_tokenizers_load_once(monkeypatch, clip_tokenizer):
    from lib_sd3.tokens import tokenizers as loading

    calls = []
    monkeypatch.setattr(loading, "load_clip_tokenizer", lambda: calls.append("clip") or clip_tokenizer)
    monkeypatch.setattr(loading, "load_t5_tokenizer", lambda: calls.append("t5") or None)
    T.forget_default_tokenizers()
    try:
        first, second = T.default_tokenizers(), T.default_tokenizers()
        assert first is second and calls == ["clip", "t5"]
    finally:
        T.forget_default_tokenizers()


def test_clip_tokenizer_fallback_builds_from_open_clip(monkeypatch):
    """Without the HF cache the CLIP tokenizer comes from open-clip's bundled BPE, with no download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = T.load_clip_tokenizer()
    assert loaded is not None
    assert loaded("a cat", add_special_tokens=False)["input_ids"] == [320, 2368]


def test_cache_is_bounded_and_counts_stay_right(clip_tokenizer, t5_tokenizer, clip_oracle):
    import random

    rng = random.Random(0)
    text = " ".join("".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(400))
    tok = T.Tokenizers.wrap(clip_tokenizer, t5_tokenizer)
    tok.clip.size = tok.t5.size = 50  # far fewer than the prompt's words
    result = T.count_prompt(text, tok, DEV)
    assert result.clip == clip_oracle(text)
    assert len(tok.clip._ids) <= 50 and len(tok.t5._ids) <= 50


class TrailingSpaceTokenizer:
    """Like transformers 4.30's T5TokenizerFast (A1111's): a trailing space is a token of its own."""

    eos_token, eos_token_id = "</s>", 1

    def __call__(self, texts, **kwargs):
        def encode(segment):
            return [2 + len(w) for w in segment.split()] + ([0] if segment.endswith(" ") and segment.strip() else [])

        out = []
        for text in texts:
            ids = []
            for k, segment in enumerate(text.split(self.eos_token)):
                ids += ([self.eos_token_id] if k else []) + encode(segment)
            out.append(ids)
        return {"input_ids": out}


def test_whole_pieces_are_the_unit_where_spaces_matter():
    tokenizer = TrailingSpaceTokenizer()
    cached = T.CachedTokenizer(tokenizer)
    assert cached.by_words is False and cached.separator == "</s>"
    runs = ["red", " car", ", ", "blue", " sky, (literal)", "a  b ", " "]
    assert cached.lengths(runs) == [len(ids) for ids in tokenizer(runs)["input_ids"]]
    assert cached.ids(runs) == tokenizer(runs)["input_ids"]
