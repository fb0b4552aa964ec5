"""One full SD3 token count (CLIP + T5, A1111 syntax) against one bare CLIPTokenizer call.

The prompt: about 300 CLIP tokens with emphasis weights, a BREAK, an AND and a prompt-editing
schedule. ``ratio`` = median time of ``count_prompt`` with cold caches (a fresh prompt every time)
over the median time of one ``CLIPTokenizer`` call on the same text, measured interleaved in one
run. ``ratio_typing`` is the keystroke case: the same prompt with one character appended each time,
caches warm, as the WebUI counter sees it. Goal: ratio <= 3.0 (issue 11; was 2.0 in issue 3, with
three encoding paths where there is one now).

CLIP vocabulary: from open-clip-torch's bundled BPE; T5: google/t5-v1_1-xxl when the HF cache has
it, else a small sentencepiece model trained here (said in the last line as ``t5=``).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core for ours and the baseline alike
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import tiny_tokenizers  # noqa: E402

from lib_sd3 import tokens as lib  # noqa: E402

ROUNDS = 200
PROMPT = (
    "(masterpiece:1.2), best quality, [a portrait photo:a painting:0.5] of a kangaroo wearing an (orange hoodie:1.3) "
    "and [blue] sunglasses, standing on the grass in front of the Sydney Opera House, holding a sign that says "
    "\"WUJIE\", ((highly detailed)), sharp focus, golden hour lighting, 85mm lens, bokeh BREAK "
    "a green sign that says \"Very Deep learning\" at the edge of the Grand Canyon, dramatic sky, (clouds:0.8), "
    "wide angle, cinematic composition, film grain, volumetric light, rim light, warm colour palette, "
    "AND a mountain lake with an oak tree in the foreground and a christmas tree in the background:0.6, "
    "snow, pine forest, reflections on the water, early morning mist, soft shadows, ultra realistic, 8k, "
    "award winning photograph, national geographic, trending on artstation, intricate details, "
    "shallow depth of field, [lens flare|light leaks], vivid colours, (perfect anatomy:1.1), five fingers, "
    "a red fox sleeping under the oak, (autumn leaves:1.2) on the ground, a wooden cabin with smoke from the "
    "chimney, a narrow path leading to the lake, [birds:flock of geese:0.3] in the sky, distant mountains "
    "with snowy peaks, soft pastel sunrise, gentle breeze, high dynamic range, crisp textures"
)


def median_seconds(run, rounds: int) -> float:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
    clip = tiny_tokenizers.clip_tokenizer(folder / "clip")
    t5 = lib.load_t5_tokenizer()
    t5_name = "google/t5-v1_1-xxl" if t5 is not None else "tiny-sentencepiece"
    t5 = t5 if t5 is not None else tiny_tokenizers.t5_tokenizer(folder / "t5")
    rules = lib.Rules()
    clip_tokens = len(clip(PROMPT, add_special_tokens=False)["input_ids"])

    # cold: every count starts without cached pieces (a different prompt each keystroke, worst case)
    bare_cold, ours_cold = [], []
    for i in range(ROUNDS):
        text = f"{i} {PROMPT}"
        started = time.perf_counter()
        clip(text)
        bare_cold.append(time.perf_counter() - started)
        tok = lib.Tokenizers.wrap(clip, t5)
        started = time.perf_counter()
        result = lib.count_prompt(text, tok, rules, steps=20)
        ours_cold.append(time.perf_counter() - started)

    # typing: one more character each time, caches warm (what the WebUI counter does per keystroke)
    tok = lib.Tokenizers.wrap(clip, t5)
    lib.count_prompt(PROMPT, tok, rules)
    bare_typing, ours_typing = [], []
    typed = PROMPT
    for i in range(ROUNDS):
        typed += " abcdefghij"[i % 11]
        started = time.perf_counter()
        clip(typed)
        bare_typing.append(time.perf_counter() - started)
        started = time.perf_counter()
        lib.count_prompt(typed, tok, rules, steps=20)
        ours_typing.append(time.perf_counter() - started)

    bare, ours = statistics.median(bare_cold), statistics.median(ours_cold)
    bare_t, ours_t = statistics.median(bare_typing), statistics.median(ours_typing)
    print(f"prompt: {len(PROMPT)} chars, {clip_tokens} CLIP tokens; counted {result.clip}/{result.clip_target} "
          f"CLIP, T5 {result.t5}/{result.t5_limit} ({t5_name})")
    print(f"cold   : bare CLIPTokenizer {bare * 1e3:.3f} ms, full count {ours * 1e3:.3f} ms")
    print(f"typing : bare CLIPTokenizer {bare_t * 1e3:.3f} ms, full count {ours_t * 1e3:.3f} ms")
    print(f"ratio={ours / bare:.2f} ratio_typing={ours_t / bare_t:.2f} bare_ms={bare * 1e3:.3f} "
          f"full_ms={ours * 1e3:.3f} clip_tokens={clip_tokens} t5={t5_name} rounds={ROUNDS}")


if __name__ == "__main__":
    main()
