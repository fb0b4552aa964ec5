"""Which SD3 state an A1111 is in, decided from what its SD3Cond class can do.

Shared by the running WebUI (:mod:`lib_sd3.webui.capabilities`, which looks at the imported
class) and the doctor (which reads the source without importing it), so both call a checkout
the same thing.
"""

from __future__ import annotations

from collections.abc import Collection

STATE_EARLY = "early-sd3"  # SD3 branch as of 34b4443c: SD3Cond in sd3_model.py, no token counting
STATE_DEV = "v1.10+"  # v1.10 / dev: sd3_cond.py with SD3Cond.get_token_count
STATE_NONE = "no-sd3"  # A1111 without SD3 support (< 1.10)


def classify(cond_members: Collection[str] | None) -> str:
    """``cond_members``: the attribute names of A1111's SD3Cond, or None when there is no SD3Cond."""
    if cond_members is None:
        return STATE_NONE
    return STATE_DEV if "get_token_count" in cond_members else STATE_EARLY
