"""The unit rules without a model: which hidden state each joint block gets, the step window, restoring forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_sd3.controlnet.control import ControlStack, ControlUnit, controlling, joint_residuals


def test_sd35_large_blocks_take_hidden_state_i_over_two():
    hidden = [torch.full((1,), float(k)) for k in range(19)]
    residuals = joint_residuals(hidden, 38)
    assert [int(r.item()) for r in residuals] == [i // 2 for i in range(38)]


def test_skipped_blocks_get_none():
    hidden = [torch.ones(1), 2 * torch.ones(1)]
    residuals = joint_residuals(hidden, 4, skipped=(1, 3))
    assert residuals[1] is None and residuals[3] is None
    assert residuals[0].item() == 1.0 and residuals[2].item() == 2.0


@pytest.mark.parametrize(("start", "end", "active_steps"), [
    (0.0, 1.0, list(range(10))),
    (0.2, 1.0, list(range(2, 10))),
    (0.0, 0.5, list(range(6))),
    (0.3, 0.3, [3]),
])
def test_window_is_a_fraction_of_the_steps_both_ends_included(start, end, active_steps):
    unit = ControlUnit(model=None, latent=torch.zeros(1), strength=0.8, start=start, end=end)
    assert [s for s in range(10) if unit.strength_at(s, 10) == 0.8] == active_steps
    assert all(unit.strength_at(s, 10) == 0.0 for s in range(10) if s not in active_steps)


class Shadowed(nn.Module):
    """A module whose forward is already shadowed by someone else (another patch)."""

    def __init__(self):
        super().__init__()
        self.joint_blocks = nn.ModuleList([nn.Identity()])
        self.forward = self.patched

    def patched(self, *args, block_residuals=None):
        return block_residuals


def test_an_existing_instance_forward_is_wrapped_and_put_back():
    module = Shadowed()
    own = module.forward
    stack = ControlStack([ControlUnit(model=None, latent=torch.zeros(1))])
    with controlling(module, stack, 0, 1) as active:
        assert active and callable(module())
    assert module.forward == own
    with controlling(module, ControlStack([]), 0, 1) as active:
        assert not active and module.forward == own
