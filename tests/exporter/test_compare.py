"""Flipped routing decisions, explained from both runs' gates: constructed cases of a near tie, a
cascade, a priority reorder and a flip that the gates cannot explain (a routing bug)."""

from __future__ import annotations

import numpy as np
import torch

from exporter.compare import compare_routing, compare_soft_routing, explain_flips, image_errors
from exporter.formats.graph import routing_output_names
from exporter.models.routing import route_top_k

LAYER = "blocks.1.mlp"


def _routing(gates: np.ndarray, capacity: int, bpr: bool):
    return route_top_k(torch.from_numpy(gates), 1, capacity, bpr)


def _as_outputs(routing) -> dict[str, np.ndarray]:
    expert, kept, slot = routing_output_names(LAYER)
    return {expert: routing.expert.numpy(), kept: routing.slot.numpy() >= 0, slot: routing.slot.numpy()}


def _explain(gates, actual_gates, capacity=4, bpr=False, errors=None, actual=None):
    expected = _routing(gates, capacity, bpr)
    outputs = _as_outputs(actual if actual is not None else _routing(actual_gates, capacity, bpr))
    parity = compare_routing(LAYER, expected, outputs, min_agreement=0.0)  # the share is not what these cases test
    return explain_flips(parity, expected, outputs, gates, actual_gates, batch_priority=bpr, image_errors=errors)


def _gates(rows) -> np.ndarray:
    return np.asarray([rows], np.float32)  # one group


def test_a_near_tie_that_rounding_reorders_is_explained_by_the_gates():
    gates = _gates([[0.5001, 0.4999], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    moved = gates.copy()
    moved[0, 0] = [0.4998, 0.5002]  # the graph's gates moved by 3e-4: the top expert changes
    r = _explain(gates, moved, errors=np.array([0.02, 0.001, 0.001, 0.001]))
    assert r.flip_count == 1 and r.unexplained == 0 and r.passed and r.causes == {"gates": 1}
    (flip,) = r.flips
    assert (flip["token"], flip["kind"], flip["expert"], flip["actual_expert"]) == (0, "expert", 0, 1)
    assert np.isclose(flip["margin"], 2e-4, atol=1e-6) and np.isclose(flip["error"], 6e-4, atol=1e-6)
    assert np.isclose(r.gate_error, 3e-4, atol=1e-6)
    # one image per token here: the flipped token's image moved most
    assert r.output_error_flipped == 0.02 and r.output_error_clean == 0.001


def test_an_expert_flip_cascades_into_kept_decisions_later_in_the_group():
    """Vanilla routing, capacity 1: token 0 leaves expert 0, so token 1 gets its slot there."""
    gates = _gates([[0.51, 0.49], [0.8, 0.2], [0.1, 0.9], [0.1, 0.9]])
    moved = gates.copy()
    moved[0, 0] = [0.48, 0.52]
    r = _explain(gates, moved, capacity=1)
    assert r.causes == {"gates": 1, "cascade": 2} and r.unexplained == 0 and r.passed
    assert {(f["token"], f["kind"]) for f in r.flips} == {(0, "expert"), (1, "kept"), (2, "kept")}


def test_a_second_choice_that_follows_a_first_choice_swap_is_explained():
    """k=2: the graph swaps the first two experts' order, so both choices differ; neither is a bug."""
    gates = np.asarray([[[0.40, 0.39, 0.21], [0.1, 0.2, 0.7]]], np.float32)
    moved = gates.copy()
    moved[0, 0] = [0.39, 0.40, 0.21]
    expected, actual = (
        route_top_k(torch.from_numpy(gates), 2, 4, False),
        route_top_k(torch.from_numpy(moved), 2, 4, False),
    )
    outputs = _as_outputs(actual)
    parity = compare_routing(LAYER, expected, outputs, min_agreement=0.0)
    r = explain_flips(parity, expected, outputs, gates, moved, batch_priority=False)
    assert r.flip_count == 2 and r.causes == {"gates": 2}
    assert all(np.isclose(f["margin"], 0.01, atol=1e-6) for f in r.flips)


def test_a_priority_reorder_under_bpr_is_explained_by_the_priorities():
    """Batch Prioritized Routing, capacity 1: two tokens of expert 0 whose priorities nearly tie swap
    who keeps the slot; no expert changes."""
    gates = _gates([[0.7001, 0.2999], [0.7, 0.3], [0.1, 0.9], [0.2, 0.8]])
    moved = gates.copy()
    moved[0, 0] = [0.6999, 0.3001]
    r = _explain(gates, moved, capacity=1, bpr=True)
    assert r.flip_count == 2 and r.causes == {"gates": 2} and r.passed
    assert all(f["kind"] == "kept" and f["margin"] <= f["error"] for f in r.flips)


def test_a_flip_the_gates_do_not_explain_fails_the_layer():
    """The same gates in both runs but another expert chosen: the routing math differs, not the rounding."""
    gates = _gates([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    wrong = _routing(gates, 4, False)
    wrong.expert[0, 0, 0] = 1
    r = _explain(gates, gates.copy(), actual=wrong)
    assert r.flip_count == 1 and r.unexplained == 1 and not r.passed
    assert r.flips[0]["cause"] == "unexplained" and r.flips[0]["margin"] is None  # no pair the gates reorder


def test_image_errors_and_soft_weights():
    expected = np.array([[1.0, -2.0], [0.5, 0.5]])
    errors = image_errors(expected, expected + np.array([[0.0, 0.2], [0.02, 0.0]]))
    np.testing.assert_allclose(errors, [0.1, 0.01])  # relative to the output's largest magnitude, 2
    dispatch = np.full((1, 2, 3), 1 / 2)
    combine = np.full((1, 2, 3), 1 / 3)
    r = compare_soft_routing(LAYER, {"dispatch": dispatch, "combine": combine},
                             {"dispatch": dispatch + 1e-3, "combine": (combine - 2e-3).reshape(1, 6)})  # fmt: skip
    assert np.isclose(r.dispatch_max_abs, 1e-3) and np.isclose(r.combine_max_abs, 2e-3)
    assert np.isclose(r.dispatch_max_rel, 2e-3) and np.isclose(r.combine_max_rel, 6e-3)
