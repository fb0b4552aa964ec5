"""Our MMDiT built for SD3 Medium computes what sd3-ref (A1111's MMDiT) computes, bit for bit.

The oracle is the sd3-ref-style MMDiT of the A1111 fakes (``tests/a1111/mmdit.py``: out-of-place products and sums,
the image stream in the patch embedding's transposed layout, token-major attention inputs) on the same weights; the
real A1111 model is compared in ``tests/webui/test_a1111_construction.py``. The SD3.5 families are held to diffusers
by ``test_mmdit_parity.py``.
"""

from __future__ import annotations

import pytest
import torch
from a1111.mmdit import TinyMMDiT

from lib_sd3.models.families import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, detect, shapes_of
from lib_sd3.models.mmdit import MMDiT
from tests import tiny_sd35

POS_GRID = 8


def _sd3_ref_pair(dtype: torch.dtype):
    """The sd3-ref-style fake and our MMDiT built for the family detected from the fake's own state dict."""
    torch.manual_seed(0)
    fake = TinyMMDiT(depth=2, dim=128, heads=2, channels=16, adm=32, context_dim=48).eval()
    # sd3-ref adds a cropped position grid; the fake has none, so ours gets a zero one (x + 0 == x)
    state = {**fake.state_dict(), "pos_embed": torch.zeros(1, POS_GRID * POS_GRID, 128)}
    family = detect(shapes_of(state))
    ours = MMDiT(family.config, dtype=torch.float32).eval()
    ours.load_state_dict(state, strict=True)
    return family, fake.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sd3_medium_is_sd3_ref_bit_for_bit(dtype):
    family, fake, ours = _sd3_ref_pair(dtype)
    assert family.name == SD3_MEDIUM
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g).to(dtype)
    context, y = torch.randn(2, 5, 48, generator=g).to(dtype), torch.randn(2, 32, generator=g).to(dtype)
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        expected, got = fake(x, t, y, context), ours(x, t, y=y, context=context)
    assert expected.abs().max().item() > 0.1
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", [SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM])
def test_a_block_leaves_its_inputs_untouched(family, tmp_path):
    """The in-place steps only write tensors the block made itself (callers keep the residual stream)."""
    path = tmp_path / f"{family}.safetensors"
    tiny_sd35.write_checkpoint(path, family)
    _, ours = tiny_sd35.load_mmdit(path)
    block = ours.joint_blocks[0]  # MMDiT-X (attn2) in SD3.5 Medium
    dim = ours.config.hidden_size
    g = torch.Generator().manual_seed(2)
    context, x, c = torch.randn(2, 7, dim, generator=g), torch.randn(2, 16, dim, generator=g), torch.randn(2, dim, generator=g)
    kept = [t.clone() for t in (context, x, c)]
    with torch.no_grad():
        block(context, x, c=c)
    assert all(torch.equal(a, b) for a, b in zip((context, x, c), kept, strict=True))
