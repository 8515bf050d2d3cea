"""``moe::SoftDispatch``'s Triton kernel against the Soft-MoE dispatch, both output layouts."""

from __future__ import annotations

import pytest
import torch

from exporter.models.soft_moe import SoftDispatch
from plugins.soft_dispatch.kernels import launch
from plugins.soft_dispatch.reference import soft_dispatch

# float16 tokens use TF32 products on a GPU (weights rounded to 10 mantissa bits); exact in the interpreter.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


def weights(images, tokens, slots, seed):
    logits = torch.randn(images, tokens, slots, generator=torch.Generator().manual_seed(seed)) * 2
    return torch.softmax(logits, dim=1), torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("expert_major", [0, 1])
@pytest.mark.parametrize(("experts", "per_expert", "tokens", "dim"), [(4, 2, 37, 40), (3, 1, 70, 20)])
def test_matches_the_reference(dtype, expert_major, experts, per_expert, tokens, dim, device):
    images, slots = 2, experts * per_expert
    dispatch, _ = weights(images, tokens, slots, seed=tokens)
    x = torch.randn(images, tokens, dim, generator=torch.Generator().manual_seed(dim)).to(dtype)
    got = launch(x.to(device), dispatch.to(device), experts, expert_major).cpu()
    want = soft_dispatch(x, dispatch, experts, expert_major)
    expected_shape = (experts, images * per_expert, dim) if expert_major else (images, slots, dim)
    assert got.dtype == dtype and got.shape == expected_shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_reference_is_the_model_dispatch():
    dispatch, _ = weights(2, 9, 6, seed=0)
    x = torch.randn(2, 9, 5)
    torch.testing.assert_close(soft_dispatch(x, dispatch, 3, 1), SoftDispatch()(x, dispatch, 3))
    slot_major = soft_dispatch(x, dispatch, 3, 0)  # [B, S, D]: slot e*p + q of image b
    torch.testing.assert_close(
        slot_major.reshape(2, 3, 2, 5).transpose(0, 1).reshape(3, 4, 5), soft_dispatch(x, dispatch, 3, 1)
    )
