"""The one table of files SD3 needs from the Hugging Face Hub: where they live, how big, which digest.

Both the downloader (:mod:`lib_sd3.fetch`) and the doctor read this table, so a digest is written
down exactly once. Several rows may share a ``filename``: they are alternative sources of the same
bytes, listed in the order they are tried (the repo A1111 itself uses first).

``confirmed`` says whether the sha256 was seen in several independent public sources (the issue's
published figures, pinned manifests of other tools). An unconfirmed or missing digest is never
trusted on its own: the downloader verifies against the server's LFS ETag (``X-Linked-Etag``, a
sha256) or, for small non-LFS files, the git blob id in ``ETag`` instead.
"""

from __future__ import annotations

import dataclasses

T5_FP16 = "t5xxl_fp16.safetensors"
T5_FP8 = "t5xxl_fp8_e4m3fn.safetensors"
CLIP_L = "clip_l.safetensors"
CLIP_G = "clip_g.safetensors"

A1111_TEXT_ENCODERS = "AUTOMATIC/stable-diffusion-3-medium-text-encoders"  # what A1111 downloads from
COMFY_TEXT_ENCODERS = "comfyanonymous/flux_text_encoders"  # the same files, public, widely mirrored
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium"  # gated: needs a token; last resort

T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
CLIP_TOKENIZER_REPO = "openai/clip-vit-large-patch14"


@dataclasses.dataclass(frozen=True)
class KnownFile:
    """One source of one file: ``{endpoint}/{repo}/resolve/{revision}/{path}`` saved as ``filename``."""

    filename: str
    repo: str
    path: str
    size: int | None  # bytes, exact; None where not published
    sha256: str | None  # hex; None where not published
    confirmed: bool  # digest seen in independent sources; otherwise verified against the server's ETag


_T5_FP16_SIZE, _T5_FP16_SHA = 9_787_841_024, "6e480b09fae049a72d2a8c5fbccb8d3e92febeb233bbe9dfe7256958a9167635"
_T5_FP8_SIZE, _T5_FP8_SHA = 4_893_934_904, "7d330da4816157540d6bb7838bf63a0f02f573fc48ca4d8de34bb0cbfd514f09"
_CLIP_L_SIZE, _CLIP_L_SHA = 246_144_152, "660c6f5b1abae9dc498ac2d21e1347d2abdb0cf6c0c0c8576cd796491d9a6cdd"
_CLIP_G_SIZE, _CLIP_G_SHA = 1_389_382_176, "ec310df2af79c318e24d20511b601a591ca8cd4f1fce1d8dff822a356bcdb1f4"

KNOWN_FILES: tuple[KnownFile, ...] = (
    KnownFile(T5_FP16, A1111_TEXT_ENCODERS, T5_FP16, _T5_FP16_SIZE, _T5_FP16_SHA, True),
    KnownFile(T5_FP16, COMFY_TEXT_ENCODERS, T5_FP16, _T5_FP16_SIZE, _T5_FP16_SHA, True),
    KnownFile(T5_FP16, SD3_MEDIUM, f"text_encoders/{T5_FP16}", _T5_FP16_SIZE, _T5_FP16_SHA, True),
    KnownFile(T5_FP8, COMFY_TEXT_ENCODERS, T5_FP8, _T5_FP8_SIZE, _T5_FP8_SHA, True),
    KnownFile(T5_FP8, SD3_MEDIUM, f"text_encoders/{T5_FP8}", _T5_FP8_SIZE, _T5_FP8_SHA, True),
    KnownFile(CLIP_L, A1111_TEXT_ENCODERS, CLIP_L, _CLIP_L_SIZE, _CLIP_L_SHA, True),
    KnownFile(CLIP_L, COMFY_TEXT_ENCODERS, CLIP_L, _CLIP_L_SIZE, _CLIP_L_SHA, True),
    # clip_g: these figures were only seen on a mirror, so they are checked against the server's ETag too.
    KnownFile(CLIP_G, A1111_TEXT_ENCODERS, CLIP_G, _CLIP_G_SIZE, _CLIP_G_SHA, False),
    KnownFile(CLIP_G, SD3_MEDIUM, f"text_encoders/{CLIP_G}", _CLIP_G_SIZE, _CLIP_G_SHA, False),
    # Tokenizers: small git (non-LFS) files; no published digests, verified against the git blob id.
    *(KnownFile(name, T5_TOKENIZER_REPO, name, None, None, False)
      for name in ("config.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json")),
    *(KnownFile(name, CLIP_TOKENIZER_REPO, name, None, None, False)
      for name in ("config.json", "merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                   "vocab.json")),
)

TOKENIZER_REPOS = (T5_TOKENIZER_REPO, CLIP_TOKENIZER_REPO)


def sources(filename: str) -> tuple[KnownFile, ...]:
    """Every known source of a text-encoder file, in the order to try them."""
    found = tuple(f for f in KNOWN_FILES if f.filename == filename and f.repo not in TOKENIZER_REPOS)
    if not found:
        raise KeyError(f"no known source for {filename!r}; known: {sorted({f.filename for f in KNOWN_FILES})}")
    return found


def tokenizer_files(repo: str) -> tuple[KnownFile, ...]:
    """The files ``from_pretrained(repo)`` reads for a tokenizer (no model weights)."""
    return tuple(f for f in KNOWN_FILES if f.repo == repo)


TEXT_ENCODER_FILES = (CLIP_L, CLIP_G, T5_FP16, T5_FP8)
"""The files A1111 looks for in ``models/CLIP`` (the doctor checks each one)."""

TOKENIZER_ESSENTIALS: dict[str, tuple[str, ...]] = {
    # The files without which ``from_pretrained(repo)`` cannot build the tokenizer at model load.
    CLIP_TOKENIZER_REPO: ("vocab.json", "merges.txt"),
    T5_TOKENIZER_REPO: ("spiece.model",),
}
