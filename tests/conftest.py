"""Shared test set-up: the repository root on sys.path so ``import lib_sd3`` works from anywhere."""

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


@pytest.fixture
def fake_webui():
    """A fake A1111 ``modules`` package (see tests/a1111/webui.py), removed after the test."""
    from a1111.webui import FakeWebUI

    from lib_sd3.webui.registry import REGISTRY

    REGISTRY.undo_all()  # verdicts from another test's fakes do not hold for this one's
    webui = FakeWebUI()
    yield webui
    REGISTRY.undo_all()
    webui.close()


@pytest.fixture
def sd3_modules(fake_webui):
    """``sd3_modules(state, cond=..., inferencer=..., **attrs)``: A1111's ``modules.models.sd3`` as the early
    SD3 branch or dev has it, inside ``fake_webui`` (tests/a1111/sd3.py); returns the module holding SD3Cond."""
    from a1111 import sd3

    return functools.partial(sd3.install, fake_webui)


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """CLIP's tokenizer built from open-clip-torch's bundled BPE (tests/tiny_tokenizers.py), once per run."""
    import tiny_tokenizers

    return tiny_tokenizers.clip_tokenizer(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def t5_tokenizer(tmp_path_factory):
    """A T5-style tokenizer on a small sentencepiece model trained here, once per run (training takes seconds)."""
    import tiny_tokenizers

    return tiny_tokenizers.t5_tokenizer(tmp_path_factory.mktemp("t5"))

