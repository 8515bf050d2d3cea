"""``moe::SoftRoute``'s Triton kernel against the two softmaxes of the Soft-MoE router."""

from __future__ import annotations

import pytest
import torch

from plugins.soft_route.kernels import launch, recipe
from plugins.soft_route.reference import soft_route


@pytest.mark.parametrize(
    ("images", "tokens", "slots", "scale"),
    [(2, 37, 8, 1.0), (1, 70, 128, 3.0), (3, 5, 6, 40.0)],  # 70 tokens x 128 slots: three row blocks
)
def test_matches_the_reference(images, tokens, slots, scale, device):
    logits = torch.randn(images, tokens, slots, generator=torch.Generator().manual_seed(tokens)) * scale
    dispatch, combine = launch(logits.to(device))
    want_dispatch, want_combine = soft_route(logits)
    torch.testing.assert_close(dispatch.cpu(), want_dispatch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combine.cpu(), want_combine, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dispatch.sum(1).cpu(), torch.ones(images, slots), rtol=1e-5, atol=1e-5)


def test_equal_logits_give_uniform_weights(device):
    dispatch, combine = launch(torch.full((1, 10, 4), 7.0, device=device))
    assert torch.allclose(dispatch.cpu(), torch.full((1, 10, 4), 0.1))
    assert torch.allclose(combine.cpu(), torch.full((1, 10, 4), 0.25))


def test_recipe_reads_the_logits_twice_in_row_blocks():
    plan = recipe(4, 196, 128)
    assert plan.constexprs == {"BLOCK_M": 32, "BLOCK_S": 128}
    assert plan.grid == (4, 1, 1)
