"""How long A1111 spends loading our script, from A1111's own startup profile (issue 21).

A1111 times every script file it loads under "load scripts" and serves the record at
``GET /internal/profile-startup``. Prints ``script_load_s=`` (our ``scripts/sd3.py``: its imports and
``startup.install()``) and ``load_scripts_s=`` (every script, A1111's and ours). Nothing is asserted on
the time itself: the machine the suite runs on is shared; the figure goes in the notes.
"""

from __future__ import annotations

OUR_SCRIPT = "sd3.py"


def _records(profile) -> dict[str, float]:
    """``{name: seconds}`` of the profile's nested records (A1111 states differ in the nesting)."""
    found: dict[str, float] = {}

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (int, float)):
                    found[prefix + key] = float(value)
                else:
                    walk(value, prefix + key + "/")
        elif isinstance(node, list):
            for item in node:
                walk(item, prefix)

    walk(profile)
    return found


def test_our_script_load_time_is_reported(webui):
    response = webui.get("/internal/profile-startup")
    assert response.status_code == 200, response.text[:300]
    records = _records(response.json())
    ours = {k: v for k, v in records.items() if k.endswith(OUR_SCRIPT) and "sd-webui-sd3" in k or
            k.endswith("/" + OUR_SCRIPT)}
    assert ours, sorted(records)[:40]
    total = next((v for k, v in records.items() if k.endswith("load scripts")), None)
    print(f"\n[{webui.state}] script_load_s={max(ours.values()):.2f} load_scripts_s={total} ({ours})")
