"""A user's own T5 file in a real A1111 (issue 12): used, said once, never renamed, even with every endpoint dead.

The file is the fixture's reduced T5 (the real T5-XXL key layout at the size the test-support extension
shrinks A1111's ``T5_CONFIG`` to) converted to bf16 with a metadata note: the right keys and shapes, another
byte length than the published (reduced) file, as a conversion from another repo would be. Before the fix the
WebUI called it missing (``SD3 T5: off (missing ...)``, ``/sd3/t5`` files false) and, with downloads on,
renamed it to ``t5xxl_fp16.safetensors.part`` before any connection. Runs after ``test_real_t5_fetch.py``.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading

from webui_support import T5_FILE, tracebacks_in, txt2img

T5_INFOTEXT = "SD3 T5"


def _refused_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _write_own_file(webui) -> bytes:
    import torch
    from safetensors.torch import load_file, save_file

    clip = webui.data_dir / "models" / "CLIP"
    state = load_file(str(webui.assets / "t5-reduced" / T5_FILE))
    tmp = clip / "own-t5.tmp"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp), metadata={"converted": "bf16 elsewhere"})
    os.replace(tmp, clip / T5_FILE)  # a new file: another inode, another length
    return (clip / T5_FILE).read_bytes()


def test_users_own_t5_file_attached_and_left_alone_with_every_endpoint_dead(webui):
    dest = webui.data_dir / "models" / "CLIP" / T5_FILE
    backup = dest.with_name("t5-before-own-file-case.bak")
    if dest.exists():  # the fetch case ran first: put its file aside, and back at the end
        os.replace(dest, backup)
    before = webui.get("/sdapi/v1/options").json()
    data = _write_own_file(webui)
    published = webui.manifest[f"t5-reduced/{T5_FILE}"]["bytes"]
    assert len(data) != published
    inode = dest.stat().st_ino

    server = webui.mirror.server  # every endpoint dead: the HF_ENDPOINT mirror stops, the setting's mirror refuses
    port, handler = server.server_address[1], server.RequestHandlerClass
    server.shutdown()
    server.server_close()
    mark = webui.mark()
    try:
        options = webui.post("/sdapi/v1/options", {"sd3_t5_mode": "fp16", "sd3_mirrors": _refused_endpoint()})
        assert options.status_code == 200, options.text
        answer = webui.post("/sd3/t5/fetch", {})
        assert answer.status_code == 200, answer.text
        status = webui.get("/sd3/t5").json()
        print(f"\n[{webui.state}] /sd3/t5 with the user's file: {status}")
        assert status["files"][T5_FILE] is True, status
        assert status["file_states"][T5_FILE]["state"] == "own", status["file_states"]
        assert status["mode"] == "fp16" and status["precision"] == "bf16", status
        _, info, log = txt2img(webui, sampler_name="Euler", seed=78)
        used = info.get("extra_generation_params", {}).get(T5_INFOTEXT)
        assert used == "fp16", f"infotext {T5_INFOTEXT!r} = {used!r}: {info.get('extra_generation_params')}"
        assert not tracebacks_in(log), tracebacks_in(log)
        assert webui.post("/sd3/t5/fetch", {}).status_code == 200  # asked again: still nothing to fetch
        log = webui.log_since(mark)
        assert dest.read_bytes() == data and dest.stat().st_ino == inode, "the user's file was renamed or rewritten"
        assert not (dest.parent / f"{T5_FILE}.part").exists()
        said = log.count("not the published file")
        assert said == 1, f"the console should say once that the file is not the published one, said {said} times"
    finally:  # leave the server as the case found it: mirror up, settings and T5 file as before
        restarted = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=restarted.serve_forever, daemon=True).start()
        webui.mirror.server = restarted
        dest.unlink(missing_ok=True)
        if backup.exists():
            os.replace(backup, dest)
        webui.post("/sdapi/v1/options", {key: before.get(key, default) for key, default in
                                         (("sd3_t5_mode", "off"), ("sd3_mirrors", ""))})
        webui.post("/sd3/t5/fetch", {})
