"""IC-Light next to SD3 in a real A1111 (issue 7), with the fake IC-Light pair of the unit suite (tests/a1111/iclight).

The fixture installs both fakes as extensions (``scripts/`` with ``libiclight/`` beside): ``sd3-test-iclight-b-old``
shaped like 8c2963e (asserts Forge in ``process_before_every_sampling``: an ``AssertionError`` on every A1111
generation) and ``sd3-test-iclight-a-new`` shaped like ff82902 (applies before every sampling through
``p.model_patcher``, which this A1111 has not got). The API's ``alwayson_scripts["IC Light"]`` reaches the
first by load order, the new one; the old one's ``ICLightArgs.fetch_from`` reads that first one too, as the real one does.
"""

from __future__ import annotations

import pytest
from webui_support import find_feature, tracebacks_in, txt2img


def _require_shim(webui) -> dict:
    status = webui.status()
    name = find_feature(status, "iclight")
    if name is None:
        pytest.skip("no IC-Light feature in /sd3/status: this build lacks issue 7's IC-Light shim")
    return status["features"][name]


def _iclight_errors(log: str) -> list[str]:
    return [block for block in tracebacks_in(log) if "ic_light" in block.lower() or "AssertionError" in block]


def test_iclight_disabled_no_assertion(webui):
    feature = _require_shim(webui)
    _, _, log = txt2img(webui, sampler_name="Euler")
    assert "AssertionError" not in log, log
    assert not _iclight_errors(log), _iclight_errors(log)
    print(f"\n[{webui.state}] IC-Light shim status: {feature}")


def test_iclight_enabled_on_sd3_is_skipped_not_500(webui):
    _require_shim(webui)
    mark = webui.mark()
    response = webui.post("/sdapi/v1/txt2img", {
        "prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": 7, "sampler_name": "Euler",
        "alwayson_scripts": {"IC Light": {"args": [{"enabled": True}]}},
    })
    log = webui.log_since(mark)
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:1000]}\n{log[-2000:]}"
    assert "AssertionError" not in log and "MMDiT.forward() got multiple values" not in log, log
    info = response.json().get("info", "")
    assert "IC-Light" in info or "IC-Light" in log or "IC Light" in log, \
        f"IC-Light was skipped silently (no infotext note, no console line):\n{info}\n{log[-1500:]}"
