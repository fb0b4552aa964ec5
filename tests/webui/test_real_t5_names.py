"""T5 files under the names users have, in a real A1111: attached from the header check, nothing downloaded.

ComfyUI users keep T5 as ``t5xxl_fp8_e4m3fn_scaled.safetensors`` (fp8 weights with per-layer scales) and the
google conversions as ``google_t5-v1_1-xxl_encoderonly-fp16.safetensors``, in ``models/CLIP`` or ComfyUI's
``models/text_encoder``. Before, only the two published names were looked at: such a file was ignored and the
9.8 GB fp16 file downloaded. Here the fixture's reduced T5 (the real key layout at the test's reduced size) is
saved under each name; with ``auto`` it must be attached, named in ``/sd3/t5``, the console and the accordion's
status, and the mirror must not be asked for anything. The server starts with T5 off; the case puts it back.
"""

from __future__ import annotations

import os

from webui_support import T5_FILE, tracebacks_in, txt2img

T5_INFOTEXT = "SD3 T5"
COMFY_SCALED = "t5xxl_fp8_e4m3fn_scaled.safetensors"
GOOGLE_FP16 = "google_t5-v1_1-xxl_encoderonly-fp16.safetensors"
LINEAR = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


def _reduced_state(webui) -> dict:
    from safetensors.torch import load_file

    return load_file(str(webui.assets / "t5-reduced" / T5_FILE))


def _scaled_fp8(state: dict) -> dict:
    """ComfyUI's "scaled fp8" layout: fp8 weights w / s, ``X.scale_weight`` = s, ``X.scale_input``, a marker."""
    import torch

    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.endswith(LINEAR):
            scale = value.float().abs().max() / 448.0
            owner = key.rsplit(".", 1)[0]
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[f"{owner}.scale_weight"], out[f"{owner}.scale_input"] = scale.reshape(()), torch.ones(())
        else:
            out[key] = value
    return out


def _save(tensors: dict, dest) -> None:
    """Saved with a note in the header, as a conversion elsewhere would be: not the published bytes."""
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"converted": dest.name})
    os.replace(tmp, dest)


def _attached(webui, key: str, mark: int) -> tuple[dict, str]:
    """Refresh T5 (``POST /sd3/t5/fetch`` decides again, like a model load), then generate once."""
    answer = webui.post("/sd3/t5/fetch", {})
    assert answer.status_code == 200, answer.text
    status = webui.get("/sd3/t5").json()
    _, info, _ = txt2img(webui, sampler_name="Euler", seed=79)
    used = info.get("extra_generation_params", {}).get(T5_INFOTEXT)
    print(f"\n[{webui.state}] /sd3/t5 with {key}: mode {status['mode']}, reason: {status['reason']}")
    assert status["loaded_file"] == key and status["files"].get(key) is True, status
    assert status["fetch_state"] in ("idle", "done"), f"a download started: {status}"
    assert used == status["mode"] and used in ("fp16", "fp8"), f"infotext {T5_INFOTEXT!r} = {used!r}, {status}"
    return status, webui.log_since(mark)


def test_t5_files_under_comfyui_and_google_names_are_attached_and_nothing_is_downloaded(webui):
    models = webui.data_dir / "models"
    published = models / "CLIP" / T5_FILE
    backup = published.with_name("t5-before-names-case.bak")
    if published.exists():  # another case left the published file: put it aside, and back at the end
        os.replace(published, backup)
    scaled, google = models / "CLIP" / COMFY_SCALED, models / "text_encoder" / GOOGLE_FP16
    before = webui.get("/sdapi/v1/options").json()
    asked_before = list(webui.mirror.requests)
    mark = webui.mark()
    try:
        state = _reduced_state(webui)
        _save(_scaled_fp8(state), scaled)
        assert webui.post("/sdapi/v1/options", {"sd3_t5_mode": "auto"}).status_code == 200

        status, log = _attached(webui, COMFY_SCALED, mark)
        assert status["mode"] == "fp8" and status["precision"] == "fp8 scaled", status
        assert status["file_states"][COMFY_SCALED]["state"] == "own", status["file_states"]
        assert f"from {COMFY_SCALED} (fp8 scaled, your own file), the only T5-XXL file here" in status["reason"]
        assert f"T5-XXL on (fp8 from {COMFY_SCALED}: fp8 scaled, the user's own file" in log, log[-3000:]
        assert log.count(f"{COMFY_SCALED}: a T5-XXL encoder") == 1, "said once in the console"
        assert "T5 download" not in log and not tracebacks_in(log), tracebacks_in(log)

        scaled.unlink()
        _save(state, google)
        status, log = _attached(webui, f"text_encoder/{GOOGLE_FP16}", webui.mark())
        assert status["precision"] == "fp16" and status["file_states"][f"text_encoder/{GOOGLE_FP16}"]["state"] == "own"
        assert not tracebacks_in(log), tracebacks_in(log)
        assert webui.mirror.requests == asked_before, f"nothing may be downloaded: {webui.mirror.requests}"
    finally:  # leave the server as the case found it: T5 off, no extra files
        scaled.unlink(missing_ok=True)
        google.unlink(missing_ok=True)
        if backup.exists():
            os.replace(backup, published)
        webui.post("/sdapi/v1/options", {"sd3_t5_mode": before.get("sd3_t5_mode", "off")})
        webui.post("/sd3/t5/fetch", {})
