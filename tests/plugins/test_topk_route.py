"""``moe::TopKRoute``'s Triton kernel against ``exporter.models.routing.route_top_k``: exact, ties included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.topk_route.kernels import BLOCK_S, launch, recipe
from plugins.topk_route.reference import topk_route

NAMES = ("expert", "slot", "weight", "slot_token")


def assert_routes_equal(gates: torch.Tensor, k: int, capacity: int, bpr: int, device: str, **attrs) -> tuple:
    got = launch(gates.to(device), k, capacity, bpr, **attrs)
    want = topk_route(gates, k, capacity, bpr, **attrs)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g.cpu(), w), f"{name} differs (k={k}, C={capacity}, bpr={bpr}, {attrs})"
    return want


def gates_with_ties(groups: int, tokens: int, experts: int, distinct: int, seed: int) -> torch.Tensor:
    """Softmax gates whose tokens repeat a few distinct rows: equal priorities across tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.softmax(torch.randn(groups, distinct, experts, generator=gen), dim=-1)
    pick = torch.randint(0, distinct, (tokens,), generator=gen)
    return rows[:, pick].contiguous()


@pytest.mark.parametrize("bpr", [0, 1])
@pytest.mark.parametrize("k", [1, 2])
def test_random_gates_with_drops(k, bpr, device):
    gen = torch.Generator().manual_seed(10 * k + bpr)
    gates = torch.softmax(torch.randn(3, 45, 6, generator=gen) * 2, dim=-1)
    capacity = 7  # 45*k/6 choices per expert on average: many dropped
    expert, slot, weight, table = assert_routes_equal(gates, k, capacity, bpr, device)
    assert (slot < 0).any() and (slot >= 0).any()
    assert (weight[slot < 0] == 0).all()


@pytest.mark.parametrize("bpr", [0, 1])
def test_exact_ties_between_tokens(bpr, device):
    gates = gates_with_ties(2, 40, 5, distinct=3, seed=1)
    assert_routes_equal(gates, 2, 6, bpr, device)


@pytest.mark.parametrize("bpr", [0, 1])
def test_ties_within_a_token_go_to_the_lower_expert(bpr, device):
    gates = torch.full((1, 12, 4), 0.25)
    gates[0, ::3, 2] = 0.4  # some tokens prefer expert 2, the rest tie everywhere
    expert, *_ = assert_routes_equal(gates, 3, 5, bpr, device)
    assert expert[0, 1].tolist() == [0, 1, 2]


def test_more_tokens_than_a_block_and_empty_slots(device):
    tokens = 2 * BLOCK_S + 23
    gates = gates_with_ties(1, tokens, 8, distinct=40, seed=3)
    for bpr in (0, 1):
        *_, table = assert_routes_equal(gates, 2, 60, bpr, device)  # capacity 60: some slots stay empty
        assert (table < 0).any()


@pytest.mark.parametrize("bpr", [0, 1])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_token_blocks_of_one_group_route_together(k, bpr, device):
    """Four programs per group (3 blocks and 5 tokens), ties across blocks, 2 groups, k up to E; the
    slot table (5 x 13 = 65 slots, 17 per program) is emptied in shares that split experts' buffers."""
    tokens = 3 * BLOCK_S + 5
    gates = gates_with_ties(2, tokens, 5, distinct=17, seed=20 + k)
    plan = recipe(2, tokens, 5, k, 13, bpr)
    assert plan.grid == (2, 4, 1)
    expert, slot, weight, table = assert_routes_equal(gates, k, 13, bpr, device)
    assert (slot < 0).any()  # far more choices than 13 slots per expert
    for capacity in (tokens * k, 3 * tokens):  # room for every choice, and empty slots in every share
        *_, table = assert_routes_equal(gates, k, capacity, bpr, device)
        assert (table < 0).any() and (table >= 0).any()


@pytest.mark.parametrize(
    "k, bpr, by_token, normalize",
    [(2, 0, 1, 0), (3, 1, 1, 1), (2, 0, 0, 1), (2, 1, 0, 2), (3, 0, 1, 3), (2, 0, 0, 3), (1, 1, 1, 3), (2, 1, 1, 2)],
)
def test_other_authors_orders_and_weights(k, bpr, by_token, normalize, device):
    """A token's choices together (loop-style layers) and renormalised weights (GShard, st-moe,
    DeepSpeed), ties across tokens and blocks, choices dropped."""
    gates = gates_with_ties(2, BLOCK_S + 9, 5, distinct=23, seed=40 + k)
    expert, slot, weight, table = assert_routes_equal(
        gates, k, 9, bpr, device, by_token=by_token, normalize=normalize, eps=1e-9
    )
    assert (slot < 0).any() and (slot >= 0).any()
    kept = slot >= 0
    if normalize == 3:  # the kept weights of a token sum to one
        sums = torch.where(kept, weight, 0.0).sum(-1)
        assert torch.allclose(sums[kept.any(-1)], torch.ones(()), atol=1e-6)
    if normalize in (1, 2) and k > 1:  # renormalised before capacity: a dropped choice's share is lost
        assert (torch.where(kept, weight, 0.0).sum(-1)[(~kept).any(-1) & kept.any(-1)] < 1 - 1e-3).all()


def test_by_token_places_a_tokens_choices_together(device):
    """Token 0 chooses experts 0 then 1, token 1 chooses 1 then 0: pass by pass, expert 1's first slot
    goes to token 1's first choice; token by token, to token 0's second choice."""
    gates = torch.tensor([[[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]]])
    _, slot, *_ = assert_routes_equal(gates, 2, 2, 0, device, by_token=0)
    assert slot[0].tolist() == [[0, 3], [2, 1]]  # flat e*C + c
    _, slot, *_ = assert_routes_equal(gates, 2, 2, 0, device, by_token=1)
    assert slot[0].tolist() == [[0, 2], [3, 1]]


@pytest.mark.parametrize(
    "rule, tokens, capacity",
    [
        (dict(cap_num=5, cap_den=16, cap_ceil=0, cap_clamp=1, cap_min=4), 40, 12),  # lucidrains, cf 1.25, E=4
        (dict(cap_num=5, cap_den=16, cap_ceil=0, cap_clamp=1, cap_min=4), 9, 4),  # the floor of 4 slots
        (dict(cap_num=1, cap_den=4, cap_ceil=1, cap_min=8), 70, 18),  # DeepSpeed: max(ceil(S/E*cf), min)
        (dict(cap_num=5, cap_den=4, cap_ceil=0, cap_pre=4, cap_mul=2, cap_align=8), 70, 48),  # 2*floor(18*5/4) to 8
    ],
)
def test_capacity_from_the_group_size(rule, tokens, capacity, device):
    gates = gates_with_ties(2, tokens, 4, distinct=tokens, seed=tokens)
    *_, table = assert_routes_equal(gates, 2, 0, 0, device, **rule)
    assert table.shape == (2, 4 * capacity)
    assert torch.equal(topk_route(gates, 2, capacity, 0)[3], table)  # the same as that fixed capacity


def test_k_equals_experts_and_capacity_one(device):
    gates = torch.softmax(torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(4)), dim=-1)
    assert_routes_equal(gates, 3, 1, 1, device)


@settings(max_examples=12, deadline=None)
@given(
    groups=st.integers(1, 2),
    tokens=st.integers(1, 70),
    experts=st.integers(2, 9),
    data=st.data(),
)
def test_matches_route_top_k(groups, tokens, experts, data):
    k = data.draw(st.integers(1, min(3, experts)), label="k")
    capacity = data.draw(st.integers(1, tokens * k), label="capacity")
    bpr = data.draw(st.integers(0, 1), label="bpr")
    by_token = data.draw(st.integers(0, 1), label="by_token")
    normalize = data.draw(st.integers(0, 3), label="normalize")
    distinct = data.draw(st.integers(1, tokens), label="distinct rows")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gates = gates_with_ties(groups, tokens, experts, distinct, seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_routes_equal(gates, k, capacity, bpr, device, by_token=by_token, normalize=normalize, eps=1e-7)


def test_recipe_rejects_bad_attributes():
    with pytest.raises(ValueError, match="k must be between"):
        recipe(1, 10, 4, 5, 3, 0)
    with pytest.raises(ValueError, match="capacity must be"):
        recipe(1, 10, 4, 2, 0, 0)
    with pytest.raises(ValueError, match="normalize must be"):
        recipe(1, 10, 4, 2, 3, 0, normalize=4)
