"""The real IC-Light next to SD3 in a real A1111 (issue 7), opt-in: the contributor's own checkouts.

``SD3_TEST_ICLIGHT_OLD`` (huchenlei/sd-forge-ic-light at 8c2963e: asserts Forge in
``process_before_every_sampling``, an ``AssertionError`` on every A1111 generation) and
``SD3_TEST_ICLIGHT_NEW`` (ff82902: applies before every sampling, fails the request on SD3), each with
``SD3_TEST_MODEL_PATCHER`` (huchenlei/sd-webui-model-patcher, which IC-Light's A1111 backend imports).
Each variant gets its own server per A1111 state, with only that IC-Light in ``extensions/`` (no
fakes), so the API's ``alwayson_scripts["IC Light"]`` reaches it. Unset, every case here is skipped.
Nothing downloads: ``remove_bg`` is off, and with SD3 loaded the shim skips IC-Light before it needs a model.
"""

from __future__ import annotations

import pytest
from webui_support import find_feature, real_iclight_params, tracebacks_in, txt2img

from lib_sd3.iclight import Shape

pytestmark = pytest.mark.parametrize("webui", real_iclight_params(), indirect=True)

EXPECTED_SHAPE = {"iclight-old": Shape.APPLY_IN_PROCESS, "iclight-new": Shape.APPLY_BEFORE_SAMPLING}
SKIP_NOTE = "IC-Light: skipped (SD3 model)"
"""The infotext entry docs/iclight.md promises for an enabled IC-Light with SD3 loaded."""
OLD_FAILURE = "AssertionError"
NEW_FAILURE = "MMDiT.forward() got multiple values"
IC_LIGHT_WORDS = ("ic_light", "ic-light", "iclight", "ic light", "modelpatcher", "model_patcher", "model-patcher")
GIT_METADATA = "*** Failed reading extension data from Git repository"
"""A1111 reading an extension's git remote and branch; a detached or remote-less checkout logs this, harmlessly."""


def _iclight_blocks(log: str) -> list[str]:
    return [block for block in tracebacks_in(log)
            if any(word in block.lower() for word in IC_LIGHT_WORDS) and not block.startswith(GIT_METADATA)]


def _assert_clean(log: str) -> None:
    """No ``AssertionError``, no IC-Light or model-patcher error, and (stricter) no server traceback at all."""
    assert OLD_FAILURE not in log and NEW_FAILURE not in log, log[-4000:]
    assert not _iclight_blocks(log), "\n\n".join(_iclight_blocks(log))
    assert not tracebacks_in(log), "\n\n".join(tracebacks_in(log))


def test_real_iclight_loads_and_is_wrapped(webui):
    """The real script imported (with the model patcher) and the shim found it, in the expected shape."""
    log = webui.log_since(0)
    assert not _iclight_blocks(log), "IC-Light or the model patcher failed at start-up:\n" + "\n\n".join(_iclight_blocks(log))
    status = webui.status()
    name = find_feature(status, "iclight")
    assert name is not None, f"no IC-Light feature in /sd3/status: {sorted(status.get('features', {}))}"
    feature = status["features"][name]
    assert feature["patches"] == {"iclight.hooks": "applied"}, feature
    shapes = {script["shape"] for script in feature["iclight_scripts"]}
    assert shapes == {EXPECTED_SHAPE[webui.variant].value}, feature
    assert len(feature["iclight_scripts"]) == 2, f"one IC-Light per tab (txt2img, img2img) expected: {feature}"
    assert feature["model_patcher"] is True, feature
    assert "cannot work in A1111 without the sd-webui-model-patcher" not in log
    print(f"\n[{webui.state} {webui.variant}] /sd3/status: {feature}")


@pytest.mark.parametrize("iclight_args", [None, {"enabled": False, "remove_bg": False}], ids=["default", "off"])
def test_real_iclight_disabled(webui, iclight_args):
    """IC-Light off (its defaults, or explicitly): the generation runs and the log stays clean."""
    extra = {} if iclight_args is None else {"alwayson_scripts": {"IC Light": {"args": [iclight_args]}}}
    _, info, log = txt2img(webui, sampler_name="Euler", **extra)
    _assert_clean(log)
    assert "IC-Light" not in info.get("infotexts", [""])[0], info
    assert "IC-Light skipped" not in log, log[-2000:]


def test_real_iclight_enabled_on_sd3_is_skipped(webui):
    """IC-Light on with SD3 loaded: HTTP 200 (txt2img asserts it), a clean log, the skip note and warning."""
    _, info, log = txt2img(webui, sampler_name="Euler",
                           alwayson_scripts={"IC Light": {"args": [{"enabled": True, "remove_bg": False}]}})
    _assert_clean(log)
    assert SKIP_NOTE in info["infotexts"][0], info["infotexts"][0]
    assert "IC-Light skipped for this generation" in log, log[-2000:]
