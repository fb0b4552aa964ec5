"""install.py and the requirement table: only missing packages, never a re-pin, silent when all is there."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from lib_sd3 import requirements
from lib_sd3.requirements import RUNTIME, Requirement

# A fake of A1111's launch.py. It answers is_installed from SD3_FAKE_MISSING, fails run_pip for
# the names in SD3_FAKE_PIP_FAILS like launch.run raises, and records every call (with the
# constraints file's content, read while it still exists) and whether torch got imported.
FAKE_LAUNCH = textwrap.dedent('''
    import atexit, json, os, re, sys

    MISSING = set(filter(None, os.environ.get("SD3_FAKE_MISSING", "").split(",")))
    FAILS = set(filter(None, os.environ.get("SD3_FAKE_PIP_FAILS", "").split(",")))
    calls = []

    def is_installed(package):
        calls.append(["is_installed", package])
        return package not in MISSING

    def run_pip(command, desc=None, live=False):
        constraints = re.search(r'-c "([^"]+)"', command)
        text = open(constraints.group(1)).read() if constraints else None
        calls.append(["run_pip", command, desc, text])
        name = command.split()[1]
        if name in FAILS:
            raise RuntimeError(f"Couldn't install {desc}.\\nCommand: pip {command}\\nError code: 1")

    @atexit.register
    def _record():
        with open(os.environ["SD3_FAKE_RECORD"], "w") as f:
            json.dump({"calls": calls, "torch_imported": "torch" in sys.modules}, f)
''')


def run_install(tmp_path, missing=(), fails=(), with_launch=True):
    fake = tmp_path / "a1111"
    fake.mkdir(exist_ok=True)
    if with_launch:
        (fake / "launch.py").write_text(FAKE_LAUNCH)
    record = tmp_path / "record.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(fake), SD3_FAKE_MISSING=",".join(missing), SD3_FAKE_PIP_FAILS=",".join(fails),
               SD3_FAKE_RECORD=str(record))
    # A1111 runs it from its own root, not the extension's: cwd is the fake root here too.
    result = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=fake, env=env, capture_output=True,
                            text=True, timeout=60)
    calls = json.loads(record.read_text()) if record.exists() else None
    return result, calls


def test_nothing_missing_is_silent_calls_no_pip_and_stays_light(tmp_path):
    result, record = run_install(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert [c for c in record["calls"] if c[0] == "run_pip"] == []
    checked = {c[1] for c in record["calls"] if c[0] == "is_installed"}
    assert {r.dist for r in RUNTIME} <= checked
    assert record["torch_imported"] is False  # start-up cost: no heavy import just to check


def test_missing_package_installed_by_bare_name_with_everything_else_held(tmp_path):
    result, record = run_install(tmp_path, missing=("sentencepiece",))
    assert result.returncode == 0, result.stderr
    pips = [c for c in record["calls"] if c[0] == "run_pip"]
    assert len(pips) == 1
    _, command, desc, constraints = pips[0]
    assert command.split()[:2] == ["install", "sentencepiece"]
    assert not re.search(r"sentencepiece\s*[<>=~!]", command)  # no specifier of our own
    assert "sentencepiece" in desc
    # every installed distribution is held at the version installed now (oracle: importlib.metadata)
    for name in ("numpy", "torch", "transformers", "safetensors"):
        if requirements.installed_here(name) or name == "numpy":
            assert f"{name}=={importlib.metadata.version(name)}\n" in constraints
    assert result.stdout == ""  # launch.run_pip prints its own "Installing ..." line; we add nothing


def test_module_found_without_metadata_counts_as_installed(tmp_path):
    # conda / vendored installs: the distribution name is unknown but the module imports
    result, record = run_install(tmp_path, missing=("pyyaml",))
    assert [c for c in record["calls"] if c[0] == "run_pip"] == []
    assert ["is_installed", "yaml"] in record["calls"]


def test_failed_install_is_one_clear_line_and_the_rest_still_installs(tmp_path):
    result, record = run_install(tmp_path, missing=("sentencepiece", "scipy"), fails=("sentencepiece",))
    assert result.returncode == 0  # never blocks A1111's start
    pips = [c[1].split()[1] for c in record["calls"] if c[0] == "run_pip"]
    assert pips == ["sentencepiece", "scipy"]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    assert "could not install sentencepiece" in lines[0] and "T5" in lines[0]
    assert "Couldn't install" in lines[0] and "Command:" not in lines[0]  # first line of the error only
    assert lines[1].endswith("-m pip install sentencepiece")


def test_without_launch_reports_nothing_when_all_present(tmp_path):
    result, record = run_install(tmp_path, with_launch=False)
    assert record is None
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_missing_checks_distribution_then_module():
    seen = {"a-dist": False, "a_mod": True, "b-dist": False, "b_mod": False, "c-dist": True}
    reqs = [Requirement("a-dist", "a_mod", "", False), Requirement("b-dist", "b_mod", "", False),
            Requirement("c-dist", "c_mod", "", True)]
    assert requirements.missing(seen.__getitem__, reqs) == [reqs[1]]


def test_installed_here_matches_a1111_lookup_rules():
    # distribution names are looked up normalised, as A1111's launch.is_installed relies on
    assert requirements.installed_here("pyyaml") and requirements.installed_here("PyYAML")
    assert requirements.installed_here("huggingface-hub") and requirements.installed_here("yaml")
    assert not requirements.installed_here("sd3-surely-not-a-package")
    assert not requirements.installed_here("not.a.module")


def test_everything_the_extension_needs_is_installed_in_the_test_venv():
    assert requirements.missing(requirements.installed_here) == []


def test_freeze_constraints_normalises_and_skips_unparseable_versions():
    text = requirements.freeze_constraints([
        ("Torch", "2.1.2+cu121"), ("PyYAML", "6.0.1"), ("clip", "1.0"), ("weird", "git-abc"),
        ("pyyaml", "5.0"), ("", "1.0"), ("open_clip_torch", "2.20.0"), ("numpy", "1.26.2"),
    ])
    assert text.splitlines() == ["clip==1.0", "numpy==1.26.2", "open-clip-torch==2.20.0", "pyyaml==6.0.1",
                                 "torch==2.1.2+cu121"]


def test_installed_distributions_sees_the_real_versions():
    import numpy

    assert ("numpy", numpy.__version__) in [(n.lower(), v) for n, v in requirements.installed_distributions()]


@pytest.mark.parametrize("requirement", RUNTIME, ids=lambda r: r.dist)
def test_pip_args_never_carry_a_version(requirement):
    args = requirements.pip_install_args(requirement, "/tmp/c.txt")
    assert args == f'install {requirement.dist} -c "/tmp/c.txt"'
