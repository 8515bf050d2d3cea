"""``moe::SoftCombine``'s Triton kernel against the Soft-MoE combine, both slot layouts."""

from __future__ import annotations

import pytest
import torch

from exporter.models.soft_moe import SoftCombine
from plugins.soft_combine.kernels import launch
from plugins.soft_combine.reference import soft_combine

TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("expert_major", [0, 1])
@pytest.mark.parametrize(("experts", "per_expert", "tokens", "dim"), [(4, 2, 37, 40), (36, 2, 70, 20)])  # 72 slots
def test_matches_the_reference(dtype, expert_major, experts, per_expert, tokens, dim, device):
    images, slots = 2, experts * per_expert
    gen = torch.Generator().manual_seed(slots + dim)
    combine = torch.softmax(torch.randn(images, tokens, slots, generator=gen) * 2, dim=-1)
    shape = (experts, images * per_expert, dim) if expert_major else (images, slots, dim)
    slot_out = torch.randn(shape, generator=gen).to(dtype)
    got = launch(slot_out.to(device), combine.to(device), experts, expert_major).cpu()
    want = soft_combine(slot_out, combine, experts, expert_major)
    assert got.dtype == dtype and got.shape == (images, tokens, dim)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_reference_is_the_model_combine():
    combine = torch.softmax(torch.randn(2, 9, 6), dim=-1)
    slot_out = torch.randn(3, 4, 5)  # n=3 experts, p=2, B=2
    torch.testing.assert_close(soft_combine(slot_out, combine, 3, 1), SoftCombine()(slot_out, combine))


def test_rejects_a_layout_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        launch(torch.zeros(2, 6, 5), torch.zeros(2, 9, 6), 3, 1)
