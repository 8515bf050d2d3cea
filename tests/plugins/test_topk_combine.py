"""``moe::TopKCombine``'s Triton kernel against the V-MoE combine: float32 accumulation, deterministic."""

from __future__ import annotations

import pytest
import torch

from exporter.models.routing import route_top_k
from exporter.models.vmoe import Combine
from plugins.topk_combine.kernels import launch
from plugins.topk_combine.reference import topk_combine
from plugins.topk_route.reference import topk_route

TOLERANCE = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("k", "dim", "bpr"), [(1, 40, 0), (2, 300, 1), (3, 17, 1)])
def test_matches_the_reference(dtype, k, dim, bpr, device):
    gen = torch.Generator().manual_seed(k * dim)
    gates = torch.softmax(torch.randn(2, 29, 5, generator=gen), dim=-1)
    capacity = 6
    _, slot, weight, _ = topk_route(gates, k, capacity, bpr)
    assert (slot < 0).any()  # some choices dropped
    expert_out = torch.randn(5, 2 * capacity, dim, generator=gen).to(dtype)
    got = launch(expert_out.to(device), slot.to(device), weight.to(device)).cpu()
    want = topk_combine(expert_out, slot, weight)
    assert got.dtype == dtype and got.shape == (2, 29, dim)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert (got[(slot < 0).all(-1)] == 0).all()  # tokens with every choice dropped get zeros
    again = launch(expert_out.to(device), slot.to(device), weight.to(device)).cpu()
    assert torch.equal(got, again)  # deterministic


def test_reference_is_the_model_combine():
    gates = torch.softmax(torch.randn(2, 15, 4, generator=torch.Generator().manual_seed(2)), dim=-1)
    _, slot, weight, _ = topk_route(gates, 2, 5, 1)
    expert_out = torch.randn(4, 10, 8)
    model = Combine()(expert_out, route_top_k(gates, 2, 5, True), 5)
    torch.testing.assert_close(topk_combine(expert_out, slot, weight), model)


def test_rejects_mismatched_shapes():
    slot = torch.zeros(2, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="do not fit"):
        launch(torch.zeros(4, 9, 8), slot, torch.zeros(2, 3, 2))  # 9 rows are not 2 groups


def test_bfloat16_kernel_path(device):
    """bfloat16 is a kernel-level extra (the plugins advertise float32/float16): same gather and sum."""
    from plugins.topk_dispatch.kernels import launch as dispatch
    from plugins.topk_dispatch.reference import topk_dispatch

    gates = torch.softmax(torch.randn(2, 21, 4, generator=torch.Generator().manual_seed(9)), dim=-1)
    _, slot, weight, table = topk_route(gates, 2, 6, 1)
    x = torch.randn(2, 21, 32).bfloat16()
    expert_in = dispatch(x.to(device), table.to(device), 4).cpu()
    assert torch.equal(expert_in, topk_dispatch(x, table, 4))
    y = launch(expert_in.to(device), slot.to(device), weight.to(device)).cpu()
    torch.testing.assert_close(y, topk_combine(expert_in, slot, weight), rtol=1e-2, atol=1e-2)
