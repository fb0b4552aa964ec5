"""The token-counter adapter against fake A1111 modules shaped like both SD3 states.

``update_token_counter`` below follows A1111's ``modules/ui.py`` step for step (callbacks, styles,
extra networks, AND, schedules, max of ``get_prompt_lengths``, the HTML it returns); the fake
``get_prompt_lengths`` bodies are the two states' (early: ``self.clip.process_texts`` -> the crash
from the field notes; dev: ``get_token_count``). Expected numbers come from the CLIP and T5 oracles.
"""

from __future__ import annotations

import re
import types
from functools import reduce

import pytest
from a1111 import sd3 as a1111_sd3
from a1111.models import Model
from feature_registration import registered

from lib_sd3 import tokens as lib
from lib_sd3.webui import hooks, routes
from lib_sd3.webui import tokens as adapter
from lib_sd3.webui.registry import REGISTRY

registered(adapter)


@pytest.fixture(scope="module")
def oracles(t5_tokenizer):
    import sentencepiece as spm
    from open_clip.tokenizer import SimpleTokenizer

    simple, pieces = SimpleTokenizer(), spm.SentencePieceProcessor(model_file=t5_tokenizer.vocab_file)
    return types.SimpleNamespace(clip=lambda t: len(simple.encode(t)), t5=lambda t: len(pieces.encode(t)))


# -- fake A1111 ----------------------------------------------------------------------------------


def early_get_prompt_lengths(self, text):  # the early SD3 branch's sd_hijack
    if self.clip is None:
        return "-", "-"
    _, token_count = self.clip.process_texts([text])
    return token_count, self.clip.get_target_prompt_token_count(token_count)


def dev_get_prompt_lengths(self, text):  # v1.10 / dev
    if self.clip is None:
        return "-", "-"
    if hasattr(self.clip, "get_token_count"):
        token_count = self.clip.get_token_count(text)
    else:
        _, token_count = self.clip.process_texts([text])
    return token_count, self.clip.get_target_prompt_token_count(token_count)


class SD1Clip:
    """A non-SD3 text encoder: whatever A1111 counts for it must come back untouched."""

    def process_texts(self, texts):
        return None, 42

    def get_target_prompt_token_count(self, count):
        return 75


class NoEmbeddings:
    def find_embedding_at_position(self, tokens, offset):
        return None, None


@pytest.fixture(params=["early", "dev"])
def webui(request, fake_webui, clip_tokenizer, t5_tokenizer):
    state = request.param
    ref = types.SimpleNamespace(clip_l=types.SimpleNamespace(tokenizer=clip_tokenizer),
                                t5xxl=types.SimpleNamespace(tokenizer=t5_tokenizer))
    cond = a1111_sd3.install(fake_webui, state).SD3Cond()
    cond.tokenizer, cond.t5xxl = ref, object()
    if state == "dev":
        cond.model_lg = types.SimpleNamespace(tokenizer=clip_tokenizer, comma_token=None)
    sd3 = Model("SD3", cond_stage_model=cond)
    hijack_class = type("StableDiffusionModelHijack", (), {
        "get_prompt_lengths": early_get_prompt_lengths if state == "early" else dev_get_prompt_lengths})
    hijack = hijack_class()
    hijack.clip, hijack.embedding_db = cond, NoEmbeddings()
    fake_webui.module("modules.sd_hijack", StableDiffusionModelHijack=hijack_class, model_hijack=hijack)
    fake_webui.shared.sd_model = sd3
    fake_webui.shared.opts.data.update(sd3_enable_t5=True, emphasis="Original", comma_padding_backtrack=20,
                                       include_styles_into_token_counters=True, sd3_token_counter=True)
    styles = {"quality": types.SimpleNamespace(prompt="{prompt}, masterpiece", negative_prompt="blurry")}
    fake_webui.shared.prompt_styles = types.SimpleNamespace(
        apply_styles_to_prompt=lambda p, names: lib.apply_styles(p, [styles[n].prompt for n in names]),
        apply_negative_styles_to_prompt=lambda p, names: lib.apply_styles(p, [styles[n].negative_prompt for n in names]),
    )
    # A1111's parser functions, same signatures and return shapes (implemented with ours: lark is not here)
    fake_webui.module("modules.extra_networks", parse_prompt=lambda p: (lib.strip_extra_networks(p), {}))
    fake_webui.module(
        "modules.prompt_parser",
        get_multicond_prompt_list=lambda ps: (None, lib.split_and(ps[0]), None),
        get_learned_conditioning_prompt_schedules=lambda ps, steps: [
            [[i + 1, t] for i, t in enumerate(lib.schedule_texts(p, steps))] for p in ps],
        parse_prompt_attention=lambda text: [[p.text, p.weight] for p in lib.parse_attention(text)],
    )
    before = []
    fake_webui.script_callbacks.before_token_counter_callback = lambda params: [c(params) for c in before]
    fake_webui.script_callbacks.on_before_token_counter = lambda c, name=None: before.append(c)
    adapter.register_callbacks(fake_webui.script_callbacks)
    yield types.SimpleNamespace(state=state, hijack=hijack, hijack_class=hijack_class, sd3=sd3, cond=cond,
                                fake=fake_webui, original=hijack_class.__dict__["get_prompt_lengths"])
    REGISTRY.undo(adapter.PATCH_NAME)
    adapter.on_model_loaded(None)


def update_token_counter(webui, text, steps=20, styles=(), is_positive=True):
    """A1111's ui.update_token_counter, same steps in the same order."""
    from modules import extra_networks, prompt_parser, script_callbacks, shared

    params = types.SimpleNamespace(prompt=text, steps=steps, styles=list(styles), is_positive=is_positive)
    script_callbacks.before_token_counter_callback(params)
    text, steps, styles, is_positive = params.prompt, params.steps, params.styles, params.is_positive
    if shared.opts.include_styles_into_token_counters:
        store = shared.prompt_styles
        text = (store.apply_styles_to_prompt if is_positive else store.apply_negative_styles_to_prompt)(text, styles)
    try:
        text, _ = extra_networks.parse_prompt(text)
        flat = prompt_parser.get_multicond_prompt_list([text])[1] if is_positive else [text]
        prompt_schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps)
    except Exception:
        prompt_schedules = [[[steps, text]]]
    flat_prompts = reduce(lambda a, b: a + b, prompt_schedules)
    prompts = [prompt_text for _, prompt_text in flat_prompts]
    token_count, max_length = max([webui.hijack.get_prompt_lengths(p) for p in prompts], key=lambda a: a[0])
    return f"<span class='gr-box gr-text-input'>{token_count}/{max_length}</span>"


def shown(html: str) -> tuple[str, dict[str, str]]:
    """What A1111 alone would show, and our data attributes."""
    data = dict(re.findall(r'data-([\w-]+)="([^"]*)"', html))
    visible = re.sub(r'<span class="sd3-tokens"[^>]*></span>', "", html)
    return re.sub(r"<[^>]+>", "", visible), data


def sync(loaded: bool) -> None:
    REGISTRY.sync(loaded)


# -- tests ------------------------------------------------------------------------------------------


def test_counter_works_for_sd3_on_both_states(webui, oracles):
    prompt = 'a kangaroo holding a sign that says "陆"'
    if webui.state == "early":
        with pytest.raises(AttributeError, match="process_texts"):  # the field notes' crash, reproduced
            update_token_counter(webui, prompt)
    sync(True)
    text, data = shown(update_token_counter(webui, prompt))
    assert text == f"{oracles.clip(prompt)}/75"
    assert data["t5"] == str(oracles.t5(prompt) + 1)
    assert data["t5-limit"] == ("" if webui.state == "early" else "77")
    assert data["t5-state"] == "ok" and data["a1111-state"] == ("early-sd3" if webui.state == "early" else "v1.10+")


def test_other_models_get_a1111s_own_function(webui):
    sd1 = Model("SD1", cond_stage_model=SD1Clip())
    sync(True)
    webui.fake.shared.sd_model = sd1  # patched, but the model is not SD3: dispatch to A1111's original
    webui.hijack.clip = sd1.cond_stage_model
    assert update_token_counter(webui, "a cat") == "<span class='gr-box gr-text-input'>42/75</span>"
    sync(False)  # model switch: the original function is back on the class, exactly
    assert webui.hijack_class.__dict__["get_prompt_lengths"] is webui.original
    assert REGISTRY.status()[adapter.PATCH_NAME]["state"] == "pending"


def test_t5_truncation_of_any_subprompt_reaches_the_page(webui, oracles):
    """The CLIP-longest sub-prompt is not the T5-longest: the whole prompt's T5 comes via the callback."""
    if webui.state == "early":
        pytest.skip("the early branch never truncates T5")
    t5_heavy, clip_heavy = "zqxv wuji " * 9, "mountain " * 70
    assert oracles.clip(t5_heavy) < oracles.clip(clip_heavy) <= 75
    assert oracles.t5(t5_heavy) + 1 > 77 >= oracles.t5(clip_heavy) + 1
    sync(True)
    text, data = shown(update_token_counter(webui, f"{t5_heavy} AND {clip_heavy}"))
    assert text == f"{oracles.clip(clip_heavy)}/75"
    assert data["t5"] == str(oracles.t5(t5_heavy.rstrip()) + 1) and data["t5-state"] == "truncated"
    assert "T5 truncated" in data["notes"]


def test_styles_and_extra_networks_follow_a1111(webui, oracles):
    sync(True)
    text, _ = shown(update_token_counter(webui, "<lora:x:0.5>a cat", styles=["quality"]))
    assert text == f"{oracles.clip('a cat, masterpiece')}/75"
    negative, _ = shown(update_token_counter(webui, "ugly AND bad", styles=["quality"], is_positive=False))
    assert negative == f"{oracles.clip('ugly AND bad, blurry')}/75"


def test_t5_disabled_is_reported(webui):
    webui.fake.shared.opts.data["sd3_enable_t5"] = False
    sync(True)
    _, data = shown(update_token_counter(webui, "a cat"))
    assert data["t5-state"] == "disabled" and "T5 disabled" in data["notes"]
    assert "reload" not in data["notes"]  # the next generation picks the setting up: no model reload needed
    webui.fake.shared.opts.data["sd3_enable_t5"] = True
    webui.cond.t5xxl = None  # T5 not loaded with the model
    assert shown(update_token_counter(webui, "a dog"))[1]["t5-state"] == "disabled"


def test_setting_off_gives_plain_numbers(webui, oracles):
    webui.fake.shared.opts.data["sd3_token_counter"] = False
    sync(True)
    assert update_token_counter(webui, "a cat") == f"<span class='gr-box gr-text-input'>{oracles.clip('a cat')}/75</span>"


def test_model_tokenizers_are_reused_nothing_loaded(webui, monkeypatch):
    def no_loading():
        raise AssertionError("tokenizer loaded per keystroke")

    monkeypatch.setattr(lib, "load_clip_tokenizer", no_loading)
    monkeypatch.setattr(lib, "load_t5_tokenizer", no_loading)
    sync(True)
    for typed in ("a", "a c", "a ca", "a cat"):
        update_token_counter(webui, typed)
    assert len(adapter._MODEL_TOKENIZERS) == 1


@pytest.mark.parametrize("prompt", ["", "(" * 300 + "x", "[a:b:1e400] [c|", "a <lora:open", "a\x00\x07 🐱 陆",
                                    "x AND y:1e9 AND AND", "(a:1.2.3) [b::] \\", "BREAK BREAK", "x" * 20000])
def test_bad_input_never_raises(webui, prompt):
    sync(True)
    text, data = shown(update_token_counter(webui, prompt, steps=30))
    count, target = text.split("/")
    assert int(count) >= 0 and int(target) >= 75 and data["t5-state"] in {"ok", "truncated"}


def test_broken_a1111_parser_falls_back_without_traceback(webui, caplog, oracles):
    def broken(*_args):
        raise RuntimeError("parser broke")

    webui.fake.module("modules.prompt_parser", parse_prompt_attention=broken,
                      get_multicond_prompt_list=broken, get_learned_conditioning_prompt_schedules=broken)
    sync(True)
    text, _ = shown(update_token_counter(webui, "(a cat:1.2)"))
    expected = "(a cat:1.2)" if webui.state == "early" else "a cat"
    assert text == f"{oracles.clip(expected)}/75"


def test_counter_target_is_still_a_number(webui):
    summary = lib.PromptCount(3, 75, None, 5, 77, True)
    target = adapter.CounterTarget(75, summary)
    assert target + 75 == 150 and str(target) == "75" and f"{target:d}" == "75" and target == 75
    assert f"{target}".startswith('75<span class="sd3-tokens" hidden')


def test_route_returns_the_counter_numbers(webui, oracles):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    sync(True)
    app = FastAPI()
    routes.mount(app)
    client = TestClient(app)
    prompt = "a [cat:dog with a long tail:0.5] AND (red:1.2) car"
    body = client.post("/sd3/token-count", json={"prompt": prompt, "negative": "ugly", "steps": 20}).json()
    text, data = shown(update_token_counter(webui, prompt))
    assert f"{body['prompt']['clip']['count']}/{body['prompt']['clip']['target']}" == text
    assert str(body["prompt"]["t5"]["count"]) == data["t5"] and body["prompt"]["t5"]["state"] == data["t5-state"]
    assert body["negative"]["clip"]["count"] == oracles.clip("ugly") and body["model_is_sd3"] is True
    for bad in ("", "(" * 500, "x" * 20000, "陆 🐱", "[a:b:-1e400]"):
        assert client.post("/sd3/token-count", json={"prompt": bad}).status_code == 200
    assert client.post("/sd3/token-count", json={"prompt": "a", "steps": 0}).status_code == 422
    assert client.post("/sd3/token-count", json={"steps": "many"}).status_code == 422
    assert client.get("/sd3/status").json()["features"][adapter.FEATURE]["state"] == "active"


def test_callbacks_registered_at_every_install(webui):
    assert adapter.register_callbacks in hooks.INSTALL
    registered = []
    adapter.register_callbacks(types.SimpleNamespace(on_before_token_counter=lambda c, name=None: registered.append(c)))
    assert registered == [adapter.before_token_counter]
    adapter.register_callbacks(types.SimpleNamespace())  # an A1111 without the callback: nothing, no error


def test_install_registers_the_token_counter_callback(fake_webui):
    from lib_sd3.webui import startup

    startup.install()
    try:
        assert fake_webui.callbacks["before_token_counter"] == [adapter.before_token_counter]
        assert REGISTRY.status()[adapter.PATCH_NAME]["sd3_only"] is True
    finally:
        REGISTRY.undo_all()
