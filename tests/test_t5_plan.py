"""lib_sd3.t5.plan: which T5 file to attach, at which precision, whether to download, and the reason given.

The files are named as users have them (ComfyUI, Stability, the google_ conversions); what matters is
what the header check reported (precision, published or not), never the name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_sd3 import t5
from lib_sd3.fetch.known_files import T5_FP8, T5_FP16
from lib_sd3.t5.plan import Candidate, plan_t5

GIB = 1 << 30
PLENTY = 64 * GIB  # fp16 fits
FP8_ONLY = t5.RESIDENT_BYTES["fp8"] + t5.HEADROOM_BYTES + GIB  # fp8 fits, fp16 does not

SCALED = Candidate("t5xxl_fp8_e4m3fn_scaled.safetensors", Path("/m/CLIP/t5xxl_fp8_e4m3fn_scaled.safetensors"),
                   "fp8 scaled", False)
GOOGLE_FP16 = Candidate("text_encoder/google_t5-v1_1-xxl_encoderonly-fp16.safetensors",
                        Path("/m/text_encoder/google_t5-v1_1-xxl_encoderonly-fp16.safetensors"), "fp16", False)
GOOGLE_FP8 = Candidate("google_t5-v1_1-xxl_encoderonly-fp8_e4m3fn.safetensors",
                       Path("/m/CLIP/google_t5-v1_1-xxl_encoderonly-fp8_e4m3fn.safetensors"), "fp8", False)
STABILITY = Candidate("t5xxl.safetensors", Path("/m/CLIP/t5xxl.safetensors"), "fp16", True)
PUBLISHED_FP16 = Candidate(T5_FP16, Path(f"/m/CLIP/{T5_FP16}"), "fp16", True)
BF16 = Candidate("t5/t5xxl_bf16.safetensors", Path("/m/CLIP/t5/t5xxl_bf16.safetensors"), "bf16", False)


@pytest.mark.parametrize("own", [SCALED, GOOGLE_FP8])
def test_auto_with_an_fp8_file_uses_it_and_downloads_nothing_even_where_fp16_fits(own):
    plan = plan_t5("auto", [own], PLENTY, None)
    assert (plan.mode, plan.load, plan.fp8, plan.fetch) == ("fp8", own, True, None)
    assert own.key in plan.reason and "your own file" in plan.reason and "the only T5-XXL file here" in plan.reason
    assert "fp16 would fit too" in plan.reason and "set 'T5-XXL text encoder' to fp16" in plan.reason


def test_asking_for_fp16_with_only_an_fp8_file_downloads_it_and_uses_the_fp8_file_meanwhile():
    plan = plan_t5("fp16", [SCALED], PLENTY, None)
    assert (plan.mode, plan.load, plan.fp8, plan.fetch) == ("fp8", SCALED, True, T5_FP16)
    assert f"until {T5_FP16} (fp16, asked for) is downloaded" in plan.reason


@pytest.mark.parametrize("own", [GOOGLE_FP16, STABILITY, BF16])
def test_a_wide_file_under_any_name_serves_fp16_and_fp8(own):
    plan = plan_t5("auto", [own], PLENTY, None)
    assert (plan.mode, plan.load, plan.fp8, plan.fetch) == ("fp16", own, False, None)
    plan = plan_t5("auto", [own], FP8_ONLY, None)  # memory for fp8 only: rounded at load, nothing fetched
    assert (plan.mode, plan.load, plan.fp8, plan.fetch) == ("fp8", own, True, None)
    plan = plan_t5("fp8", [own], PLENTY, None)
    assert (plan.mode, plan.load, plan.fp8, plan.fetch) == ("fp8", own, True, None)


def test_preference_published_then_listed_order_and_native_fp8_for_fp8():
    files = [SCALED, GOOGLE_FP16, PUBLISHED_FP16]
    plan = plan_t5("auto", files, PLENTY, None)
    assert plan.load == PUBLISHED_FP16 and "preferred of 3 T5-XXL files" in plan.reason
    assert "the 'T5-XXL file' setting picks another" in plan.reason
    plan = plan_t5("auto", [GOOGLE_FP16, BF16], PLENTY, None)
    assert plan.load == GOOGLE_FP16
    plan = plan_t5("auto", files, FP8_ONLY, None)
    assert plan.load == SCALED and plan.fp8, "fp8 weights as they are beat rounding an fp16 file"


def test_the_setting_picks_a_file_by_key_or_name():
    files = [PUBLISHED_FP16, GOOGLE_FP16, SCALED]
    plan = plan_t5("auto", files, PLENTY, None, picked=GOOGLE_FP16.key)
    assert plan.load == GOOGLE_FP16 and "picked in the 'T5-XXL file' setting" in plan.reason
    plan = plan_t5("auto", files, PLENTY, None, picked=GOOGLE_FP16.path.name)
    assert plan.load == GOOGLE_FP16
    plan = plan_t5("fp16", files, PLENTY, None, picked=SCALED.key)  # the user's pick: no download over it
    assert (plan.mode, plan.load, plan.fetch) == ("fp8", SCALED, None) and "serves as fp8" in plan.reason


def test_a_picked_file_that_is_not_there_says_so_and_picks_another():
    plan = plan_t5("auto", [SCALED], PLENTY, None, picked="gone.safetensors")
    assert plan.load == SCALED and "'gone.safetensors' (the 'T5-XXL file' setting) is not a usable" in plan.reason
    plan = plan_t5("auto", [], PLENTY, None, picked="gone.safetensors")
    assert plan.load is None and plan.fetch == T5_FP16 and "gone.safetensors" in plan.reason


def test_nothing_on_disk_downloads_what_fits_and_memory_always_decides():
    plan = plan_t5("auto", [], PLENTY, None)
    assert (plan.mode, plan.load, plan.fetch) == ("fp16", None, T5_FP16) and "no T5-XXL file here" in plan.reason
    plan = plan_t5("auto", [], FP8_ONLY, None)
    assert (plan.mode, plan.fetch) == ("fp8", T5_FP8)
    plan = plan_t5("auto", [SCALED, PUBLISHED_FP16], 4 * GIB, None)
    assert (plan.mode, plan.load, plan.fetch) == ("off", None, None) and "needs" in plan.reason
    plan = plan_t5("off", [PUBLISHED_FP16], PLENTY, None)
    assert (plan.mode, plan.load, plan.fetch) == ("off", None, None) and "switched off" in plan.reason
    with pytest.raises(ValueError, match="allowed"):
        plan_t5("fp4", [], PLENTY, None)


def test_the_reason_never_promises_a_download_while_downloads_are_off():
    plan = plan_t5("fp16", [SCALED], PLENTY, None, downloads=False)
    assert plan.fetch == T5_FP16 and "downloads are off" in plan.reason and "is downloaded" not in plan.reason
    plan = plan_t5("auto", [], PLENTY, None, downloads=False)
    assert plan.fetch == T5_FP16 and "is needed, and downloads are off" in plan.reason
