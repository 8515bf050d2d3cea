"""V-MoE routing against the reference: its published golden case, its capacity table, and a plain
NumPy transcription of ``vmoe.moe._get_top_experts_per_item_common`` on random cases with exact
ties and dropped tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import compute_capacity, route_top_k, vmoe_combine_weights
from exporter.errors import UserError

GOLDEN_GATES = torch.tensor([[[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]])


def reference_combine_weights(gates: np.ndarray, k: int, capacity: int, batch_priority: bool) -> np.ndarray:
    """NumPy transcription of the reference (cumsum, stable argsort) for one group ``[S, E]``."""
    group_size, num_experts = gates.shape
    expert_index = np.argsort(-gates, axis=1, kind="stable")[:, :k]  # lax.top_k: ties -> lower index
    top_gates = np.take_along_axis(gates, expert_index, axis=1)
    if batch_priority:
        perm = np.argsort(-top_gates[:, 0], kind="stable")  # jnp.argsort is stable
        expert_index = expert_index[perm]
    order = expert_index.T.reshape(-1)
    one_hot = np.eye(num_experts, dtype=np.int64)[order]
    buffer_index = np.cumsum(one_hot, axis=0) * one_hot - 1
    buffer_index = buffer_index.reshape(k, group_size, num_experts).transpose(1, 0, 2)
    if batch_priority:
        buffer_index = buffer_index[np.argsort(perm, kind="stable")]
    position = buffer_index.max(axis=1)
    dispatch = position[..., None] == np.arange(capacity)
    return gates[..., None] * dispatch


def _routes(combine: torch.Tensor) -> dict[int, list[tuple[int, int, float]]]:
    """token -> [(expert, slot, weight)] of the non-zero combine weights, for readable asserts."""
    out: dict[int, list] = {}
    for s, e, c in torch.nonzero(combine[0]).tolist():
        out.setdefault(s, []).append((e, c, round(float(combine[0, s, e, c]), 6)))
    return out


def test_golden_vanilla_matches_the_reference_test():
    combine = vmoe_combine_weights(GOLDEN_GATES, k=2, capacity=2, batch_priority=False)
    assert _routes(combine) == {0: [(0, 0, 0.4), (2, 1, 0.2)], 1: [(0, 1, 0.5)], 2: [(2, 0, 0.6)]}


def test_golden_batch_priority_matches_the_reference_test():
    combine = vmoe_combine_weights(GOLDEN_GATES, k=2, capacity=2, batch_priority=True)
    assert _routes(combine) == {0: [(0, 1, 0.4)], 1: [(0, 0, 0.5), (2, 1, 0.4)], 2: [(2, 0, 0.6)]}


def test_golden_routing_decisions():
    r = route_top_k(GOLDEN_GATES, 2, 2, batch_priority=True)
    assert r.expert.tolist() == [[[0, 2], [0, 2], [2, 0]]]
    assert r.slot.tolist() == [[[1, -1], [0, 1], [0, -1]]]
    assert torch.equal(r.weight, torch.tensor([[[0.4, 0.0], [0.5, 0.4], [0.6, 0.0]]]))


@pytest.mark.parametrize(
    "group_size, experts, k, factor, capacity",
    [
        (400, 8, 2, 1.05, 108),  # S/32 pretrain, 8 images
        (400, 8, 2, 4.0, 400),  # S/32 eval override
        (1160, 8, 2, 1.5, 436),  # S/32 at 384
        (1576, 8, 2, 1.05, 416),  # B/16, E=8
        (1576, 32, 2, 1.05, 104),  # B/16, E=32
        (4616, 8, 2, 1.5, 1732),  # B/16 at 384
        (400, 32, 2, 0.5, 16),  # padding inflates small C
        (32, 32, 2, 1.0, 4),  # the reference test: ceil(64/32) = 2, padded to 4
    ],
)
def test_capacity_matches_the_reference_table(group_size, experts, k, factor, capacity):
    assert compute_capacity(group_size * k, experts, factor) == capacity


def test_capacity_round_is_half_to_even_and_multiple_is_optional():
    assert compute_capacity(10, 4, 1.0, "round", None) == 2  # 2.5 -> 2
    assert compute_capacity(14, 4, 1.0, "round", None) == 4  # 3.5 -> 4
    assert compute_capacity(10, 4, 1.0, "ceil", None) == 3
    assert compute_capacity(10, 4, 1.0, "ceil", 4) == 4


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_capacity_factor_must_be_positive(factor):
    with pytest.raises(UserError, match="capacity factor"):
        compute_capacity(10, 4, factor)


def test_capacity_below_one_is_an_error():
    with pytest.raises(UserError, match="must be >= 1"):
        compute_capacity(2, 64, 0.01, "round", None)


def test_k_larger_than_experts_is_an_error():
    with pytest.raises(UserError, match="k must be"):
        vmoe_combine_weights(GOLDEN_GATES, k=4, capacity=2, batch_priority=False)


def test_exactly_one_of_capacity_and_factor():
    with pytest.raises(UserError, match="exactly one"):
        vmoe_combine_weights(GOLDEN_GATES, k=1, batch_priority=False)
    with pytest.raises(UserError, match="exactly one"):
        vmoe_combine_weights(GOLDEN_GATES, k=1, capacity=2, capacity_factor=1.0, batch_priority=False)


@st.composite
def routing_cases(draw):
    """Gates from small integer logits: exact ties between experts and between tokens are common."""
    groups = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 40))
    experts = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(experts, 3)))
    capacity = draw(st.integers(1, max(1, group_size * k // experts + 2)))
    logits = draw(
        st.lists(st.integers(-2, 2), min_size=groups * group_size * experts, max_size=groups * group_size * experts)
    )
    gates = torch.softmax(torch.tensor(logits, dtype=torch.float32).reshape(groups, group_size, experts), dim=-1)
    if draw(st.booleans()) and group_size > 1:  # identical patches: whole rows tie
        gates[:, 1] = gates[:, 0]
    return gates, k, capacity, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(routing_cases())
def test_combine_weights_equal_the_reference_transcription(case):
    gates, k, capacity, batch_priority = case
    ours = vmoe_combine_weights(gates, k=k, capacity=capacity, batch_priority=batch_priority).numpy()
    for g in range(gates.shape[0]):
        expected = reference_combine_weights(gates[g].numpy(), k, capacity, batch_priority)
        np.testing.assert_array_equal(ours[g], expected)


@settings(max_examples=100, deadline=None)
@given(routing_cases())
def test_routing_invariants(case):
    gates, k, capacity, batch_priority = case
    r = route_top_k(gates, k, capacity, batch_priority)
    kept = r.slot >= 0
    # every kept (token, choice) has its own slot, below the capacity
    assert int(r.slot.max()) < capacity
    for g in range(gates.shape[0]):
        slots = [(e, s) for e, s in zip(r.expert[g][kept[g]].tolist(), r.slot[g][kept[g]].tolist())]
        assert len(slots) == len(set(slots))
    # an expert's buffer fills from slot 0 without holes
    for g in range(gates.shape[0]):
        for e in range(gates.shape[-1]):
            used = sorted(r.slot[g][kept[g] & (r.expert[g] == e)].tolist())
            assert used == list(range(len(used)))
    # weights are the raw gates of kept choices (no renormalisation), 0 when dropped
    raw = torch.gather(gates, -1, r.expert)
    assert torch.equal(r.weight, torch.where(kept, raw, torch.zeros_like(raw)))
    # the k choices of a token are distinct experts
    if k > 1:
        assert (r.expert[..., 0] != r.expert[..., 1]).all()


def test_batch_priority_keeps_the_highest_gates_when_capacity_is_low():
    torch.manual_seed(0)
    gates = torch.softmax(3 * torch.randn(1, 64, 4), dim=-1)
    capacity = compute_capacity(64, 4, 0.25)  # k=1: 4 slots per expert for 64 tokens
    r = route_top_k(gates, 1, capacity, batch_priority=True)
    for e in range(4):
        mine = r.expert[0, :, 0] == e
        kept_gates = gates[0, mine, e][r.slot[0, mine, 0] >= 0]
        dropped_gates = gates[0, mine, e][r.slot[0, mine, 0] < 0]
        if len(dropped_gates):
            assert kept_gates.min() >= dropped_gates.max()


def test_drops_fall_monotonically_as_capacity_grows():
    torch.manual_seed(1)
    gates = torch.softmax(torch.randn(2, 100, 8), dim=-1)
    dropped = []
    for factor in (0.1, 0.25, 0.5, 1.0, 2.0, 4.0):
        cap = compute_capacity(100 * 2, 8, factor)
        for bpr in (False, True):
            dropped.append((factor, bpr, int((route_top_k(gates, 2, cap, bpr).slot < 0).sum())))
    for bpr in (False, True):
        counts = [d for f, b, d in dropped if b == bpr]
        assert counts == sorted(counts, reverse=True)
        assert counts[0] > 0 and counts[-1] == 0


def test_routing_is_exact_for_large_groups():
    """Positions are float32 matmul counts: exact for a B/16 group (1576 tokens, E=32)."""
    torch.manual_seed(2)
    gates = torch.softmax(torch.randn(1, 1576, 32), dim=-1)
    cap = compute_capacity(1576 * 2, 32, 1.05)
    ours = vmoe_combine_weights(gates, k=2, capacity=cap, batch_priority=True).numpy()
    np.testing.assert_array_equal(ours[0], reference_combine_weights(gates[0].numpy(), 2, cap, True))
    assert math.isclose(cap, 104)
