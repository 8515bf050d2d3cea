"""The compiled Triton kernels on a GPU (no TensorRT needed) against the references, at the
V-MoE B/16 and Soft-MoE S/16 layer shapes."""

from __future__ import annotations

import pytest
import torch

from exporter.models.routing import compute_capacity
from plugins.soft_combine.kernels import launch as soft_combine
from plugins.soft_combine.reference import soft_combine as soft_combine_ref
from plugins.soft_dispatch.kernels import launch as soft_dispatch
from plugins.soft_dispatch.reference import soft_dispatch as soft_dispatch_ref
from plugins.soft_route.kernels import launch as soft_route
from plugins.soft_route.reference import soft_route as soft_route_ref
from plugins.topk_combine.kernels import launch as topk_combine
from plugins.topk_combine.reference import topk_combine as topk_combine_ref
from plugins.topk_dispatch.kernels import launch as topk_dispatch
from plugins.topk_dispatch.reference import topk_dispatch as topk_dispatch_ref
from plugins.topk_route.kernels import launch as topk_route
from plugins.topk_route.reference import topk_route as topk_route_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run the compiled kernels")

GROUP = 8 * 197  # routing groups of 8 images of 197 tokens
GROUP_384 = 8 * 577  # the 384 px fine-tunes: 8 images of 577 tokens


@pytest.mark.parametrize("bpr", [0, 1])
@pytest.mark.parametrize("experts", [8, 32])
def test_vmoe_layer(experts, bpr):
    gen = torch.Generator().manual_seed(experts + bpr)
    k, dim = 2, 768
    capacity = compute_capacity(GROUP * k, experts, 1.05)
    gates = torch.softmax(torch.randn(4, GROUP, experts, generator=gen), dim=-1)
    gates[:, 100:300] = gates[:, 0:1]  # exact ties between tokens
    got = topk_route(gates.cuda(), k, capacity, bpr)
    want = topk_route_ref(gates, k, capacity, bpr)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
    _, slot, weight, table = want
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
        x = torch.randn(4, GROUP, dim, generator=gen).to(dtype)
        assert torch.equal(topk_dispatch(x.cuda(), table.cuda(), experts).cpu(), topk_dispatch_ref(x, table, experts))
        expert_out = torch.randn(experts, 4 * capacity, dim, generator=gen).to(dtype)
        y = topk_combine(expert_out.cuda(), slot.cuda(), weight.cuda(), capacity).cpu()
        torch.testing.assert_close(y, topk_combine_ref(expert_out, slot, weight, capacity), rtol=tol, atol=tol)


@pytest.mark.parametrize("bpr", [0, 1])
def test_vmoe_routing_of_384px_groups(bpr):
    """4,616-token groups (73 token blocks per group) at C=1.5, as vmoe-b16-in21k-ft-ilsvrc2012-384."""
    gen = torch.Generator().manual_seed(384 + bpr)
    capacity = compute_capacity(GROUP_384 * 2, 8, 1.5)
    gates = torch.softmax(torch.randn(2, GROUP_384, 8, generator=gen) * 2, dim=-1)
    gates[:, 1000:1500] = gates[:, 7:8]  # exact ties between tokens of different blocks
    got = topk_route(gates.cuda(), 2, capacity, bpr)
    for g, w in zip(got, topk_route_ref(gates, 2, capacity, bpr)):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("expert_major", [0, 1])
def test_soft_moe_layer(expert_major):
    gen = torch.Generator().manual_seed(expert_major)
    images, tokens, experts, dim = 8, 196, 128, 384
    logits = torch.randn(images, tokens, experts, generator=gen) * 4
    dispatch, combine = soft_route(logits.cuda())
    want_dispatch, want_combine = soft_route_ref(logits)
    torch.testing.assert_close(dispatch.cpu(), want_dispatch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combine.cpu(), want_combine, rtol=1e-5, atol=1e-6)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        x = torch.randn(images, tokens, dim, generator=gen).to(dtype)
        slots = soft_dispatch(x.cuda(), want_dispatch.cuda(), experts, expert_major).cpu()
        want = soft_dispatch_ref(x, want_dispatch, experts, expert_major)
        torch.testing.assert_close(slots, want, rtol=tol, atol=tol)
        y = soft_combine(want.cuda(), want_combine.cuda(), experts, expert_major).cpu()
        torch.testing.assert_close(y, soft_combine_ref(want, want_combine, experts, expert_major), rtol=tol, atol=tol)
