"""Opt-in: the doctor on a real A1111 checkout (WEBUI_ROOT for dev / v1.10, WEBUI_ROOT_EARLY for 34b4443c).

Reads the checkout only; no A1111 venv needed. The expected state and targets come from plain
substring checks on the real files, independent of the doctor's AST and regex reading.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib_sd3.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.webui


def expected_state(webui: Path) -> str:
    cond = webui / "modules/models/sd3/sd3_cond.py"
    model = webui / "modules/models/sd3/sd3_model.py"
    if cond.is_file() and "def get_token_count" in cond.read_text(encoding="utf-8"):
        return "v1.10"
    if model.is_file() and "class SD3Cond" in model.read_text(encoding="utf-8"):
        return "early SD3 branch"
    return "none"


@pytest.mark.parametrize("var", ["WEBUI_ROOT", "WEBUI_ROOT_EARLY"])
def test_doctor_reads_a_real_checkout(var):
    if not os.environ.get(var):
        pytest.skip(f"{var} not set")
    webui = Path(os.environ[var])
    result = subprocess.run([sys.executable, "-m", "lib_sd3", "doctor", "--webui", str(webui), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    rows = {(c["section"], c["item"]): c for c in report["checks"]}
    state = rows[("A1111", "SD3 support")]
    assert state["detail"].startswith(expected_state(webui))
    assert (result.returncode == 0) == report["sd3_can_work"]
    # every target the extension patches exists in both real states (dev and 34b4443c)
    found = {c["item"]: c["status"] for c in report["checks"] if c["section"] == "patch targets"}
    assert found == {target.patch: "OK" for target in TARGETS}
