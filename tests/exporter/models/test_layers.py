"""The MoE layers against the reference's einsum dispatcher: dense one-hot dispatch/combine and a
Python loop over experts, i.e. ``EinsumDispatcher`` + ``sparse_moe_spmd`` written out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exporter import capture_routing, soft_moe_weights, vmoe_combine_weights
from exporter.errors import UserError
from exporter.models import SoftMoEMlp, VMoEMlp


def _expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return F.gelu(x @ ex.w1[e] + ex.b1[e], approximate="tanh") @ ex.w2[e] + ex.b2[e]


def reference_vmoe(layer: VMoEMlp, x: torch.Tensor) -> torch.Tensor:
    images, tokens, dim = x.shape
    grouped = x.reshape(-1, layer.group_images * tokens, dim)
    gates = torch.softmax(layer.router(grouped), dim=-1)
    cap = layer.capacity(grouped.shape[1])
    combine = vmoe_combine_weights(gates, k=layer.k, capacity=cap, batch_priority=layer.batch_priority)
    routing = layer.routing(gates, cap)  # the dispatch mask: kept slots (a zero gate still takes one)
    dispatch = torch.zeros_like(combine)
    for c in range(layer.k):
        kept = routing.slot[..., c] >= 0
        g, s = torch.nonzero(kept, as_tuple=True)
        dispatch[g, s, routing.expert[g, s, c], routing.slot[g, s, c]] = 1.0
    expert_in = torch.einsum("gsec,gsd->gecd", dispatch, grouped)
    expert_out = torch.stack([_expert(layer, e, expert_in[:, e]) for e in range(layer.num_experts)], dim=1)
    return torch.einsum("gsec,gecd->gsd", combine, expert_out).reshape(images, tokens, dim)


def _seeded(layer):
    layer.init_(torch.Generator().manual_seed(0))
    return layer.eval()


@pytest.mark.parametrize("group_images", [1, 4])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_vmoe_layer_equals_the_einsum_reference(group_images, k, batch_priority, capacity_factor):
    layer = _seeded(
        VMoEMlp(
            16, 24, 4, k=k, capacity_factor=capacity_factor, batch_priority=batch_priority, group_images=group_images
        )
    )
    x = torch.randn(8, 9, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_routing() as records:
        y = layer(x)
        expected = reference_vmoe(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    ((recorded_layer, routing),) = records
    assert recorded_layer is layer
    assert routing.slot.shape == (8 // group_images, group_images * 9, k)
    dropped = (routing.slot < 0).float().mean().item()
    assert (dropped > 0) == (capacity_factor < 1)


def test_a_dropped_token_gets_nothing_from_the_layer():
    """Capacity 1 per expert: every dropped (token, choice) contributes zero, so a fully dropped
    token's MoE output is exactly zero and only the residual carries it."""
    layer = _seeded(VMoEMlp(8, 8, 2, k=1, capacity=1, group_images=1))
    x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture_routing() as records:
        y = layer(x)
    routing = records[0][1]
    dropped = routing.slot[0, :, 0] < 0
    assert dropped.sum() >= 4  # 6 tokens, 2 experts x 1 slot
    assert torch.equal(y[0, dropped], torch.zeros_like(y[0, dropped]))
    assert (y[0, ~dropped].abs().sum(-1) > 0).all()


def test_batch_must_be_a_multiple_of_the_group():
    layer = VMoEMlp(8, 8, 2, group_images=4)
    with pytest.raises(UserError, match="not a multiple of the routing group"):
        layer(torch.randn(6, 3, 8))


@pytest.mark.parametrize("kwargs, message", [(dict(k=3), "k must be"), (dict(capacity_factor=0.0), "capacity factor")])
def test_layer_rejects_impossible_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        VMoEMlp(8, 8, 2, **kwargs)


def test_soft_moe_layer_equals_the_einsum_reference():
    layer = SoftMoEMlp(12, 20, 5, slots_per_expert=3)
    layer.router.init_(torch.Generator().manual_seed(0))
    layer.experts.init_(torch.Generator().manual_seed(1))
    layer.router.scale.data.fill_(2.5)
    x = torch.randn(3, 10, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
        outs = []
        for i in range(3):  # the reference routes each image as its own group
            dispatch, combine = soft_moe_weights(x[i : i + 1], layer.router.mu, layer.router.scale)
            slots = torch.einsum("gmnp,gmd->gnpd", dispatch, x[i : i + 1])
            slot_out = torch.stack([_expert(layer, e, slots[:, e]) for e in range(5)], dim=1)
            outs.append(torch.einsum("gmnp,gnpd->gmd", combine, slot_out))
    torch.testing.assert_close(y, torch.cat(outs), rtol=1e-5, atol=1e-6)
