"""tutel's routing rules as moe-export computes them (exporter.models.tutel_routing). The whole rule set is
checked against tutel itself in tests/exporter/sources/checkpoints/test_swin_moe.py (every decision of 15
cases); here: the capacity arithmetic a graph does on its batch size, the edges tutel's own code cannot run
(a capacity of 0), and the static shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exporter.errors import UserError
from exporter.models.tutel_routing import (
    RATIO_CHECK_TOKENS,
    align,
    buffer_slots,
    capacity_ratio,
    route_tutel,
    tutel_capacity,
)


@pytest.mark.parametrize("cf", [1.25, 0.5, 1.0, 2.0, 0.3, 1.05, 0.1, 0.25, 3.7, -0.5, -1.25])
def test_the_integer_capacity_rule_equals_python_float_arithmetic(cf):
    """tutel computes ``int(cf * ceil(N / E))`` in Python floats; the graph computes ``(p * x) // q`` on
    integers. They agree for every token count up to ``RATIO_CHECK_TOKENS`` per expert (checked when the
    fraction is chosen), here again at spot values, cases where the float product rounds badly included."""
    p, q = capacity_ratio(cf)
    for x in (0, 1, 7, 20, 99, 100, 128, 1000, 4096, 65537, RATIO_CHECK_TOKENS):
        assert (p * x) // q == int(abs(cf) * x), (cf, x)
    assert q <= 10**6


def test_a_capacity_factor_without_an_integer_rule_is_refused_for_graphs_only():
    """0.7 is a little less than 7/10 in binary, and Python's products round to either side of the
    integers: ``int(0.7 * 10) == 7`` but ``int(0.7 * 90) == 62``. No integer rule matches that, so a graph
    cannot follow the batch size; the PyTorch model computes it as tutel does."""
    assert int(0.7 * 10) == 7 and int(0.7 * 90) == 62
    with pytest.raises(UserError, match=r"int\(0.7 \* 90\) == 62\), so a graph cannot compute it"):
        capacity_ratio(0.7)
    with pytest.raises(UserError, match="no fixed fraction"):
        capacity_ratio(math.pi / 3)
    assert tutel_capacity(360, 4, 1, 0.7) == int(0.7 * 90) == 62  # eager: Python floats, as tutel
    with pytest.raises(UserError, match="finite"):
        capacity_ratio(float("inf"))


@pytest.mark.parametrize(
    ("tokens", "experts", "k", "cf", "alignment", "capacity"),
    [
        (512, 4, 1, 1.25, 1, 160),  # the fixtures' first layer, batch of 8
        (64, 4, 1, 1.25, 1, 20),  # one image
        (512, 4, 2, 0.5, 1, 128),
        (512, 4, 1, 0.3, 4, 40),  # 38, aligned to 4
        (16, 4, 1, 0.3, 4, 4),  # 1, aligned to 4
        (1152, 32, 1, 1.25, 1, 45),  # Swin-MoE-S stage 3, batch of 8 at 192 px: 144 tokens an image
        (144, 32, 1, 1.25, 1, 6),  # the same, batch 1
        (36, 32, 1, 0.25, 1, 0),  # stage 4, batch 1: tutel raises here; every choice is dropped
    ],
)
def test_static_capacity(tokens, experts, k, cf, alignment, capacity):
    assert tutel_capacity(tokens, experts, k, cf, alignment) == capacity
    assert buffer_slots(tokens, experts, k, cf, alignment) == max(capacity, 1)


def test_dynamic_capacity_buffers_hold_the_bound():
    assert buffer_slots(100, 4, 2, 0.0, 1) == 100  # cf 0: at most every token
    assert buffer_slots(100, 4, 2, 0.0, 8) == 104
    assert buffer_slots(100, 4, 2, -0.5, 1) == 2 * int(0.5 * 25)
    assert align(13, 4) == 16 and align(16, 4) == 16 and align(13, 1) == 13


def gates(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(1, tokens, experts, generator=g) * 2, dim=-1)


def test_a_capacity_of_zero_drops_every_choice():
    routing, capacity = route_tutel(gates(36, 32), k=1, capacity_factor=0.25, batch_priority=True)
    assert capacity == 0 and (routing.slot == -1).all() and not routing.weight.any()


def test_every_first_choice_goes_before_any_second_and_locations_are_dense():
    routing, capacity = route_tutel(gates(200, 4), k=2, capacity_factor=10.0, batch_priority=True)
    expert, slot = routing.expert[0], routing.slot[0]
    assert (slot >= 0).all()  # capacity 2 * int(10 * 50) = 1000: nothing drops
    for e in range(4):
        first, second = slot[:, 0][expert[:, 0] == e], slot[:, 1][expert[:, 1] == e]
        assert sorted(first.tolist()) == list(range(len(first)))
        assert sorted(second.tolist()) == list(range(len(first), len(first) + len(second)))


def test_bpr_orders_by_the_top_gate_and_ties_go_to_the_lower_token():
    g = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]]])
    routing, _ = route_tutel(g, k=1, capacity_factor=1.5, batch_priority=True)  # capacity int(1.5 * 2) = 3
    assert routing.slot[0, :, 0].tolist() == [2, 0, -1, 1]  # 0.9, 0.7 first; of the tied 0.6s, token 0
    routing, _ = route_tutel(g, k=1, capacity_factor=1.5, batch_priority=False)
    assert routing.slot[0, :, 0].tolist() == [0, 1, 2, -1]


def test_normalized_gates_divide_by_the_sum_of_the_tokens_k_gates():
    g = gates(50, 6)
    raw, _ = route_tutel(g, k=2, capacity_factor=0.5, batch_priority=True)
    norm, _ = route_tutel(g, k=2, capacity_factor=0.5, batch_priority=True, normalize_gate=True)
    top = g[0].topk(2, dim=-1).values
    kept = norm.slot[0] >= 0
    expected = (top / top.sum(-1, keepdim=True))[kept]
    assert torch.equal(raw.slot, norm.slot) and torch.allclose(norm.weight[0][kept], expected)
    assert torch.equal(raw.weight[0][kept], top[kept])  # raw gates otherwise
    single, _ = route_tutel(g, k=1, capacity_factor=0.5, batch_priority=True, normalize_gate=True)
    assert torch.equal(single.weight[0][single.slot[0] >= 0], top[:, :1][single.slot[0] >= 0])  # k=1: raw


def test_shapes_are_static_and_inputs_checked():
    routing, _ = route_tutel(gates(10, 3), k=2, capacity_factor=1.0, batch_priority=False)
    assert routing.expert.shape == routing.slot.shape == routing.weight.shape == (1, 10, 2)
    with pytest.raises(UserError, match="one routing group"):
        route_tutel(gates(10, 3).expand(2, -1, -1), k=1, capacity_factor=1.0, batch_priority=False)
    with pytest.raises(UserError, match="alignment"):
        route_tutel(gates(10, 3), k=1, capacity_factor=1.0, batch_priority=False, alignment=0)
    assert np.isfinite(routing.weight.numpy()).all()
