"""Each plugin's reference (plugins/<op>/reference.py, torch only, shipped in bundles) equals the
model code the exporter traces (exporter.models), ties and dropped choices included. The TopKRoute
reference is written the reference implementation's way (stable sorts and a cumsum), so this also
holds the cumsum-free routing of the exported graph against vmoe's algorithm."""

from __future__ import annotations

import pytest
import torch

from exporter.models.routing import TopKRouting, route_top_k
from exporter.models.soft_moe import SoftCombine, SoftDispatch
from exporter.models.vmoe import Combine, slot_tokens
from plugins.soft_combine.reference import soft_combine
from plugins.soft_dispatch.reference import soft_dispatch
from plugins.topk_combine.reference import topk_combine
from plugins.topk_route.reference import topk_route


def _gates(groups: int, tokens: int, experts: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(groups, tokens, experts, generator=g)
    if ties:  # whole rows and single gates equal: ties between experts and between token priorities
        logits = (logits * 2).round() / 2
        logits[:, ::3] = logits[:, :1]
    return logits.softmax(-1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k,capacity", [(1, 1), (2, 2), (2, 4), (3, 3), (2, 64)])
@pytest.mark.parametrize("bpr", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_route_reference_is_the_model_routing(seed, k, capacity, bpr, ties):
    gates = _gates(3, 16, 4, seed, ties)
    expert, slot, weight, table = topk_route(gates, k, capacity, bpr)
    model = route_top_k(gates, k, capacity, bool(bpr))
    kept = model.slot >= 0
    assert torch.equal(expert.long(), model.expert)
    assert torch.equal(slot.long(), torch.where(kept, model.expert * capacity + model.slot, -1))
    assert torch.equal(weight, model.weight)
    assert torch.equal(table.long(), slot_tokens(model, 4, capacity))
    if capacity == 1:
        assert (~kept).any()  # the case drops choices


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k,capacity", [(1, 2), (2, 3), (3, 5), (2, 64)])
@pytest.mark.parametrize("bpr", [0, 1])
@pytest.mark.parametrize("by_token,normalize", [(1, 0), (0, 1), (1, 2), (0, 3), (1, 3)])
def test_other_authors_semantics_in_the_reference_are_the_model_routing(seed, k, capacity, bpr, by_token, normalize):
    """The reference's cumsum over tokens (by_token) and its renormalised weights equal the model's
    matmul routing, ties and drops included."""
    gates = _gates(2, 15, 4, seed, ties=True)
    attrs = dict(by_token=by_token, normalize=normalize, eps=1e-9)
    expert, slot, weight, table = topk_route(gates, k, capacity, bpr, **attrs)
    model = route_top_k(gates, k, capacity, bool(bpr), **attrs)
    assert torch.equal(expert.long(), model.expert)
    assert torch.equal(slot.long(), torch.where(model.slot >= 0, model.expert * capacity + model.slot, -1))
    assert torch.equal(weight, model.weight)
    assert torch.equal(table.long(), slot_tokens(model, 4, capacity))


@pytest.mark.parametrize("seed", range(3))
def test_topk_combine_reference_is_the_model_combine(seed):
    gates, capacity = _gates(2, 12, 4, seed, ties=True), 4
    _, slot, weight, _ = topk_route(gates, 2, capacity, 1)
    expert_out = torch.randn(4, 2 * capacity, 8, generator=torch.Generator().manual_seed(seed))
    routing = route_top_k(gates, 2, capacity, True)
    expected = Combine()(expert_out, routing, capacity)
    torch.testing.assert_close(topk_combine(expert_out, slot, weight), expected, rtol=1e-6, atol=1e-6)
    dropped = TopKRouting(routing.expert, torch.full_like(routing.slot, -1), torch.zeros_like(routing.weight))
    assert torch.equal(Combine()(expert_out, dropped, capacity), torch.zeros(2, 12, 8))


@pytest.mark.parametrize("expert_major", [0, 1])
def test_soft_references_are_the_model_layers(expert_major):
    g = torch.Generator().manual_seed(0)
    images, tokens, experts, per_expert, dim = 2, 9, 3, 2, 5
    x = torch.randn(images, tokens, dim, generator=g)
    logits = torch.randn(images, tokens, experts * per_expert, generator=g)
    dispatch, combine = logits.softmax(1), logits.softmax(2)
    slots = soft_dispatch(x, dispatch, experts, expert_major)
    tokens_out = soft_combine(slots, combine, experts, expert_major)
    if expert_major:  # the model's own layout
        torch.testing.assert_close(slots, SoftDispatch()(x, dispatch, experts))
        torch.testing.assert_close(tokens_out, SoftCombine()(slots, combine))
    else:
        torch.testing.assert_close(slots, torch.einsum("bms,bmd->bsd", dispatch, x))
        torch.testing.assert_close(tokens_out, torch.einsum("bms,bsd->bmd", combine, slots))
