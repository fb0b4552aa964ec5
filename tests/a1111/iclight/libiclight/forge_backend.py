"""Fake of ``libiclight/forge_backend.py``: imports Forge's ``ldm_patched``, absent in A1111."""

from ldm_patched.modules.model_patcher import ModelPatcher  # noqa: F401


def apply_ic_light(p, args):
    raise AssertionError("the Forge backend never runs in these tests")
