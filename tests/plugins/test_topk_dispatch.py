"""``moe::TopKDispatch``'s Triton kernel against the V-MoE gather: exact, empty slots are zeros."""

from __future__ import annotations

import pytest
import torch

from exporter.models.routing import route_top_k
from exporter.models.vmoe import Dispatch
from plugins.topk_dispatch.kernels import blocks, launch
from plugins.topk_dispatch.reference import topk_dispatch
from plugins.topk_route.reference import topk_route


def routed(groups, tokens, experts, k, capacity, bpr, seed):
    gen = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(groups, tokens, experts, generator=gen), dim=-1)
    return gates, topk_route(gates, k, capacity, bpr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("dim", "capacity"), [(24, 3), (300, 20)])  # drops / empty slots; 300 > one column block
def test_matches_the_reference_gather(dtype, dim, capacity, device):
    gates, (_, _, _, table) = routed(3, 33, 4, 2, capacity, 1, seed=dim)
    x = torch.randn(3, 33, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = launch(x.to(device), table.to(device), 4).cpu()
    want = topk_dispatch(x, table, 4)
    assert got.dtype == dtype and got.shape == (4, 3 * capacity, dim)
    assert torch.equal(got, want)
    empty = (table < 0).reshape(3, 4, capacity).transpose(0, 1).reshape(-1)
    assert (got.reshape(-1, dim)[empty] == 0).all()
    if capacity == 20:
        assert empty.any()


def test_reference_is_the_model_dispatch():
    gates, (_, _, _, table) = routed(2, 17, 3, 2, 6, 0, seed=5)
    x = torch.randn(2, 17, 8)
    model = Dispatch()(x, route_top_k(gates, 2, 6, False), 3, 6)
    assert torch.equal(topk_dispatch(x, table, 3), model)


def test_block_shape():
    assert blocks(768) == (8, 256)
    assert blocks(40) == (32, 64)
    with pytest.raises(ValueError, match="does not fit"):
        launch(torch.zeros(2, 3, 4), torch.zeros(2, 7, dtype=torch.int32), 2)
