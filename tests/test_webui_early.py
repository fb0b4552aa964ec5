"""The early-SD3-branch fixes (issue 13) against stand-in A1111 shapes: applied on the early shape, not on dev's.

The real paths (img2img, inpainting, hires fix, long prompts on both states) are in tests/webui/test_real_early.py.
"""

from __future__ import annotations

import logging

import pytest
from a1111 import sd3
from a1111.models import Model
from a1111.sd3 import DevInferencer, DevSD3Cond, EarlyInferencer, EarlySD3Cond, FakeClipLG, FakeCond, FakeT5
from feature_registration import registered

from lib_sd3.patching import PatchState
from lib_sd3.webui import early, early_long_prompts, infotext, tokens
from lib_sd3.webui.registry import REGISTRY

registered(early, early_long_prompts, tokens)


def process_images_inner(p):
    """``processing.process_images_inner``: here it only reports the size it was given."""
    return (p.width, p.height)


class EarlyImg2Img:
    """``processing.StableDiffusionProcessingImg2Img`` as on 34b4443c: a 4-channel mask in ``sd_model.dtype``."""

    mask = None
    nmask = None

    def __init__(self, sd_model):
        self.sd_model = sd_model

    def init(self, latmask):
        import numpy as np
        import torch

        latmask = np.tile(latmask[None], (4, 1, 1))
        self.mask = torch.asarray(1.0 - latmask).type(self.sd_model.dtype)
        self.nmask = torch.asarray(latmask).type(self.sd_model.dtype)


class DevImg2Img(EarlyImg2Img):
    def init(self, latmask, init_latent):
        import numpy as np
        import torch

        latmask = np.tile(latmask[None], (init_latent.shape[1], 1, 1))
        self.mask = torch.asarray(1.0 - latmask).type(torch.float32)



class ChunkingBase:
    """``sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase``'s place on the early branch."""


def early_shape(fake_webui):
    sd3.install(fake_webui, "early")
    fake_webui.module("modules.sd_hijack_clip", FrozenCLIPEmbedderWithCustomWordsBase=ChunkingBase)
    fake_webui.module("modules.processing", StableDiffusionProcessingImg2Img=EarlyImg2Img,
                      process_images_inner=process_images_inner)
    fake_webui.module("modules.devices", dtype="the devices.dtype")


def dev_shape(fake_webui):
    sd3.install(fake_webui, "dev")
    fake_webui.module("modules.sd_hijack_clip", TextConditionalModel=ChunkingBase)
    fake_webui.module("modules.processing", StableDiffusionProcessingImg2Img=DevImg2Img,
                      process_images_inner=process_images_inner)


def test_first_stage_encoding_added_on_the_early_shape(fake_webui):
    early_shape(fake_webui)
    assert REGISTRY.apply("early.get_first_stage_encoding") is PatchState.APPLIED
    latent = object()
    assert EarlyInferencer().get_first_stage_encoding(latent) is latent  # dev's is the identity too
    REGISTRY.undo("early.get_first_stage_encoding")
    assert not hasattr(EarlyInferencer, "get_first_stage_encoding")


def test_first_stage_encoding_left_alone_on_the_dev_shape(fake_webui, caplog):
    dev_shape(fake_webui)
    with caplog.at_level(logging.WARNING):
        assert REGISTRY.apply("early.get_first_stage_encoding") is PatchState.UNAVAILABLE
    assert "not needed" in REGISTRY.get("early.get_first_stage_encoding").reason
    assert DevInferencer().get_first_stage_encoding(1) == ("dev's own", 1)
    assert not caplog.records, "a patch dev does not need must not warn"


def test_first_stage_encoding_without_sd3(fake_webui):
    assert REGISTRY.apply("early.get_first_stage_encoding") is PatchState.UNAVAILABLE
    assert "no SD3Inferencer" in REGISTRY.get("early.get_first_stage_encoding").reason


def test_model_dtype_added_where_img2img_reads_it(fake_webui):
    early_shape(fake_webui)
    assert REGISTRY.apply("early.dtype") is PatchState.APPLIED
    assert EarlyInferencer().dtype == "the devices.dtype"  # what dev casts the mask to
    REGISTRY.undo("early.dtype")
    assert not hasattr(EarlyInferencer, "dtype")


def test_status_reports_the_added_methods_as_targets_found(fake_webui):
    """Once applied, the detector finds the method the patch added ("not needed"): the status must still say
    the target is there, not report a missing one."""
    from lib_sd3.webui.capabilities import capabilities

    early_shape(fake_webui)
    for name in ("early.get_first_stage_encoding", "early.dtype"):
        assert REGISTRY.apply(name) is PatchState.APPLIED
    try:
        targets = capabilities()["patch_targets"]
        assert targets["early.get_first_stage_encoding"] is True and targets["early.dtype"] is True
    finally:
        for name in ("early.get_first_stage_encoding", "early.dtype"):
            REGISTRY.undo(name)


def test_model_dtype_not_added_on_the_dev_shape(fake_webui):
    dev_shape(fake_webui)
    assert REGISTRY.apply("early.dtype") is PatchState.UNAVAILABLE
    assert not hasattr(DevInferencer, "dtype")


def test_inpainting_mask_tiled_to_the_latent_channels_on_the_early_shape(fake_webui):
    import numpy as np
    import torch

    early_shape(fake_webui)
    EarlyInferencer.dtype = torch.float32
    try:
        assert REGISTRY.apply("early.inpainting_mask") is PatchState.APPLIED
        model = EarlyInferencer()
        model.latent_channels = 16
        p = EarlyImg2Img(model)
        latmask = np.array([[0.0, 1.0], [1.0, 0.25]], dtype=np.float32)
        p.init(latmask)
        assert p.mask.shape == p.nmask.shape == (16, 2, 2)
        assert torch.equal(p.nmask, torch.from_numpy(latmask)[None].repeat(16, 1, 1))
        assert torch.equal(p.mask, 1 - p.nmask)
        sd15 = EarlyImg2Img(type("SD15", (), {"dtype": torch.float32, "latent_channels": 4})())
        sd15.init(latmask)
        assert sd15.mask.shape == (4, 2, 2)  # other models keep A1111's mask
        REGISTRY.undo("early.inpainting_mask")
        assert EarlyImg2Img.mask is None and p.mask.shape == (16, 2, 2)
    finally:
        del EarlyInferencer.dtype


def test_inpainting_mask_left_alone_on_the_dev_shape(fake_webui):
    dev_shape(fake_webui)
    assert REGISTRY.apply("early.inpainting_mask") is PatchState.UNAVAILABLE
    assert DevImg2Img.mask is None


@pytest.mark.parametrize(("size", "rounded"), [((72, 72), (64, 64)), ((1000, 776), (992, 768)), ((64, 48), (64, 48))])
def test_sizes_rounded_to_16_on_the_early_shape(fake_webui, size, rounded):
    import types

    early_shape(fake_webui)
    assert REGISTRY.apply("early.fix_dimensions") is PatchState.APPLIED
    processing = fake_webui.module("modules.processing")
    p = types.SimpleNamespace(width=size[0], height=size[1])
    fake_webui.shared.sd_model = Model("SD1")
    assert processing.process_images_inner(p) == size  # other models: A1111's sizes
    fake_webui.shared.sd_model = Model("SD3")
    assert processing.process_images_inner(p) == rounded  # dev's fix_dimensions
    REGISTRY.undo("early.fix_dimensions")
    assert processing.process_images_inner is process_images_inner


def test_sizes_left_alone_on_the_dev_shape(fake_webui):
    dev_shape(fake_webui)
    assert REGISTRY.apply("early.fix_dimensions") is PatchState.UNAVAILABLE
    assert fake_webui.module("modules.processing").process_images_inner is process_images_inner


def test_long_prompts_applied_on_the_early_shape(fake_webui):
    early_shape(fake_webui)
    original = EarlySD3Cond.forward
    assert REGISTRY.apply(early_long_prompts.PATCH_NAME) is PatchState.APPLIED
    assert EarlySD3Cond.forward is not original and early_long_prompts.chunks_like_dev()
    tokens.on_model_loaded(None)  # the counter decides its rules per model load
    assert tokens.encoder_state() == tokens.lib.STATE_DEV
    REGISTRY.undo(early_long_prompts.PATCH_NAME)
    assert EarlySD3Cond.forward is original and not early_long_prompts.chunks_like_dev()
    tokens.on_model_loaded(None)
    assert tokens.encoder_state() == tokens.lib.STATE_EARLY


def test_long_prompts_left_alone_on_the_dev_shape(fake_webui):
    dev_shape(fake_webui)
    assert REGISTRY.apply(early_long_prompts.PATCH_NAME) is PatchState.UNAVAILABLE
    assert "not needed" in REGISTRY.get(early_long_prompts.PATCH_NAME).reason
    assert DevSD3Cond.forward is EarlySD3Cond.forward


def test_long_prompts_need_a1111s_chunking_model(sd3_modules):
    sd3_modules("early")
    assert REGISTRY.apply(early_long_prompts.PATCH_NAME) is PatchState.UNAVAILABLE
    assert "sd_hijack_clip" in REGISTRY.get(early_long_prompts.PATCH_NAME).reason


@pytest.mark.parametrize(("text", "target"), [("a cat", 77), ("a cat BREAK a dog", 77), ("cat " * 100, 77),
                                              ("cat " * 100, 154)])
def test_t5_tokens_as_dev(t5_tokenizer, text, target):
    """Dev's ``Sd3T5.tokenize_line``: BREAK dropped, EOS, padded with 0 or cut to the CLIP length."""
    def parse(line):  # A1111's parse_prompt_attention on text without emphasis: runs and BREAK markers
        runs = [[part.strip(), 1.0] for part in line.split("BREAK")]
        return [piece for run in runs for piece in (run, ["BREAK", -1])][:-1]

    ids = early_long_prompts.t5_tokens(t5_tokenizer, text, target, parse)
    words = text.replace("BREAK", " ").split()
    expected = [i for word in [" ".join(words)] for i in t5_tokenizer(word, add_special_tokens=False)["input_ids"]]
    end = t5_tokenizer("", padding="max_length", max_length=2)["input_ids"][0]
    assert len(ids) == target
    if len(expected) + 1 <= target:
        assert ids[:len(expected) + 1] == expected + [end]
        assert set(ids[len(expected) + 1:]) <= {0}
    else:
        assert ids == expected[:target]


def encoder_env(fake_webui, t5_on):
    import types

    fake_webui.shared.opts.data.update({"sd3_enable_t5": t5_on, "emphasis": "None"})
    fake_webui.module("modules.devices", device="cpu")
    fake_webui.module("modules.prompt_parser", parse_prompt_attention=lambda text: [[text, 1.0]])
    hijack = types.SimpleNamespace(extra_generation_params={})
    fake_webui.module("modules.sd_hijack", model_hijack=hijack)
    return hijack


@pytest.mark.parametrize("t5_on", [True, False])
def test_early_encoder_output_as_dev(fake_webui, t5_tokenizer, t5_on):
    """Per prompt: CLIP's chunks then T5 padded to the same length (zeros without T5), the pooled vector."""
    import torch

    hijack = encoder_env(fake_webui, t5_on)
    t5 = FakeT5()
    cond = FakeCond(t5_tokenizer, t5)  # the encoder holds it weakly, as A1111's model holds it
    encoder = early_long_prompts.EarlyEncoder(cond, FakeClipLG)
    out = encoder(["a cat", "a dog"])
    assert [sorted(o) for o in out] == [["crossattn", "vector"]] * 2
    assert out[0]["crossattn"].shape == (308, 4096) and out[1]["vector"].shape == (2048,)
    assert torch.equal(out[0]["crossattn"][:154], torch.ones(154, 4096))
    assert torch.equal(out[0]["crossattn"][154:], torch.full((154, 4096), 3.0 if t5_on else 0.0))
    if t5_on:
        assert t5.calls == [[early_long_prompts.t5_tokens(t5_tokenizer, text, 154, None) for text in ("a cat", "a dog")]]
    else:
        assert t5.calls == []
    assert infotext.T5_CUT not in hijack.extra_generation_params


def test_early_encoder_says_when_t5_is_cut(fake_webui, t5_tokenizer, caplog):
    hijack = encoder_env(fake_webui, True)
    cond = FakeCond(t5_tokenizer, FakeT5())
    encoder = early_long_prompts.EarlyEncoder(cond, FakeClipLG)
    text = "cat " * 400
    whole = len(early_long_prompts.t5_ids(t5_tokenizer, text, None))
    with caplog.at_level(logging.WARNING):
        encoder([text])
        encoder([text])
    assert hijack.extra_generation_params[infotext.T5_CUT].startswith(f"154 of {whole} tokens")
    assert len([r for r in caplog.records if "T5 gets" in r.getMessage()]) == 1
