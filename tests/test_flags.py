"""The command-line flags, declared once (lib_sd3/webui/flags.py) and added by preload.py as A1111 loads it."""

import argparse
import importlib.util

import pytest
from conftest import ROOT

from lib_sd3.t5 import MODES as T5_MODES
from lib_sd3.webui import flags


def preload_parser() -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location("sd3_preload_under_test", ROOT / "preload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.preload(parser)
    return parser


def test_preload_adds_every_declared_flag_with_its_default():
    parser = preload_parser()
    defaults = vars(parser.parse_args([]))
    assert defaults == {f.name: f.default for f in flags.FLAGS}
    given = vars(parser.parse_args(["--sd3-t5", "fp8", "--sd3-no-fetch", "--sd3-mirror", "a,b", "--sd3-mixdq", "x.yaml"]))
    assert given == {"sd3_t5": "fp8", "sd3_no_fetch": True, "sd3_mirror": "a,b", "sd3_mixdq": "x.yaml"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--sd3-t5", "fp4"])
    assert flags.BY_NAME["sd3_t5"].choices == T5_MODES  # the T5 words are typed once, in lib_sd3/t5/__init__.py


def test_flag_defaults_outside_the_webui(fake_webui):
    assert flags.flag("sd3_no_fetch") is False and flags.flag("sd3_mixdq") is None
    fake_webui.shared.cmd_opts.sd3_mixdq = "w8a8"
    assert flags.flag("sd3_mixdq") == "w8a8"
