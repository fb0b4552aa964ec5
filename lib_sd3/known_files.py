"""The SD3 text-encoder files A1111 loads from ``models/CLIP``: where they come from, their size and digest.

One table for everything that needs these facts: the doctor checks files on disk against it, the
fetcher downloads and verifies with it, the README cites it. Sizes are exact byte counts. A digest
is ``confirmed`` when the published figure agrees across independent sources (the Hugging Face
file pages and several public download manifests that verify these files); clip_g's has been seen
on a mirror only. An unconfirmed digest must never be used to call a file corrupt: verify it
against the server's LFS ETag instead.
"""

from __future__ import annotations

import dataclasses

HF_ENDPOINT = "https://huggingface.co"

A1111_REPO = "AUTOMATIC/stable-diffusion-3-medium-text-encoders"  # what A1111 itself downloads from
COMFY_REPO = "comfyanonymous/flux_text_encoders"
STABILITY_REPO = "stabilityai/stable-diffusion-3-medium"  # gated: needs a Hugging Face token


@dataclasses.dataclass(frozen=True)
class Source:
    repo: str
    path: str  # inside the repository
    revision: str = "main"
    gated: bool = False

    def url(self, endpoint: str = HF_ENDPOINT) -> str:
        """The ``resolve`` URL every Hugging Face endpoint and mirror speaks."""
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.path}"


@dataclasses.dataclass(frozen=True)
class KnownFile:
    filename: str  # name in models/CLIP, as A1111 looks it up
    encoder: str  # clip_l | clip_g | t5xxl
    size: int  # bytes
    sha256: str
    digest_confirmed: bool
    sources: tuple[Source, ...]  # in the order to try them


KNOWN_FILES: tuple[KnownFile, ...] = (
    KnownFile("clip_l.safetensors", "clip_l", 246_144_152,
              "660c6f5b1abae9dc498ac2d21e1347d2abdb0cf6c0c0c8576cd796491d9a6cdd", True,
              (Source(A1111_REPO, "clip_l.safetensors"), Source(COMFY_REPO, "clip_l.safetensors"),
               Source(STABILITY_REPO, "text_encoders/clip_l.safetensors", gated=True))),
    KnownFile("clip_g.safetensors", "clip_g", 1_389_382_176,
              "ec310df2af79c318e24d20511b601a591ca8cd4f1fce1d8dff822a356bcdb1f4", False,  # seen on a mirror only
              (Source(A1111_REPO, "clip_g.safetensors"),
               Source(STABILITY_REPO, "text_encoders/clip_g.safetensors", gated=True))),
    KnownFile("t5xxl_fp16.safetensors", "t5xxl", 9_787_841_024,
              "6e480b09fae049a72d2a8c5fbccb8d3e92febeb233bbe9dfe7256958a9167635", True,
              (Source(A1111_REPO, "t5xxl_fp16.safetensors"), Source(COMFY_REPO, "t5xxl_fp16.safetensors"),
               Source(STABILITY_REPO, "text_encoders/t5xxl_fp16.safetensors", gated=True))),
    KnownFile("t5xxl_fp8_e4m3fn.safetensors", "t5xxl", 4_893_934_904,
              "7d330da4816157540d6bb7838bf63a0f02f573fc48ca4d8de34bb0cbfd514f09", True,
              (Source(COMFY_REPO, "t5xxl_fp8_e4m3fn.safetensors"),
               Source(STABILITY_REPO, "text_encoders/t5xxl_fp8_e4m3fn.safetensors", gated=True))),
)

BY_NAME = {f.filename: f for f in KNOWN_FILES}

TOKENIZER_REPOS: dict[str, tuple[str, ...]] = {
    # repo -> files the tokenizer needs (A1111 loads them with from_pretrained at model load)
    "openai/clip-vit-large-patch14": ("vocab.json", "merges.txt"),
    "google/t5-v1_1-xxl": ("spiece.model",),
}
