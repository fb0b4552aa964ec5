"""Real tokenizers without downloads, for tests and benchmarks.

CLIP: openai's vocab.json / merges.txt derived from the BPE file open-clip-torch ships (the same
vocabulary as openai/clip-vit-large-patch14). T5: a small sentencepiece unigram model trained here,
laid out like T5's (pad 0, EOS 1, unk 2), loaded through transformers' T5TokenizerFast exactly as
A1111 loads google/t5-v1_1-xxl. The real T5 tokenizer is used where the HF cache has it.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from lib_sd3 import tokens

WORDS = (
    "a green sign that says very deep learning and is at the edge of the grand canyon portrait photo of kangaroo "
    "wearing an orange hoodie blue sunglasses standing on grass in front sydney opera house holding chest "
    "masterpiece best quality detailed landscape mountain lake oak christmas tree foreground background cat dog "
    "red car sky sun with many words long tail very"
).split()
SYLLABLES = ("ka", "ro", "mi", "sun", "de", "ep", "lan", "gro", "tre", "ph", "qu", "zy", "ox", "st", "ing")


def clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer built from open-clip's bundled BPE file."""
    from transformers import CLIPTokenizer

    bpe = tokens.open_clip_bpe_file()
    if bpe is None:
        raise FileNotFoundError("open-clip-torch's bpe_simple_vocab_16e6.txt.gz not found")
    return CLIPTokenizer(*map(str, tokens.write_clip_vocab(bpe, folder)))


def train_t5_model(folder: Path, vocab_size: int = 1000) -> Path:
    """Train a T5-shaped sentencepiece model (a fraction of a second) into ``folder/spiece.model``."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = list(WORDS) + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    tails = (",", ".", "!", " (x:1.2)", " 陆", " 🐱", " [a:b:0.5]")
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(tails) for _ in range(4000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def t5_tokenizer(folder: Path):
    from transformers import T5TokenizerFast

    train_t5_model(folder)
    return T5TokenizerFast.from_pretrained(str(folder))
