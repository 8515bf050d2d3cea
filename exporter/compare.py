"""Comparing arrays the way parity does: one relative error per output, and per V-MoE layer the
share of (token, choice) pairs with the same routing decisions. numpy only.

A buffer slot that differs while expert and kept/dropped agree for every pair is a reordering inside
one expert's buffer: tokens whose priorities tie in one runtime and differ by a rounding error in the
other swap places. The same tokens reach the same experts with the same weights, so outputs are
unaffected; such swaps are counted and shown, and do not fail the check. Any difference in expert or
kept/dropped (the decisions that cascade through a buffer) does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from exporter.errors import UserError
from exporter.formats.graph import routing_output_names


class RoutingArrays(NamedTuple):
    """One layer's routing decisions as arrays ``[G, S, K]``: expert index and buffer slot (-1: dropped)."""

    expert: np.ndarray
    slot: np.ndarray


@dataclass
class OutputParity:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max|actual - expected| / max|expected|
    passed: bool


@dataclass
class RoutingParity:
    layer: str
    pairs: int  # (token, choice) pairs compared
    expert: float  # share with the same expert
    kept: float  # share with the same kept/dropped decision
    slot: float  # share with the same buffer slot
    agreement: float  # share where all three agree
    dropped_expected: float  # share of pairs dropped by the reference
    dropped_actual: float
    passed: bool
    decisions: float = 1.0  # share with the same expert and kept/dropped decision: the pass criterion
    slot_swaps: int = 0  # pairs with the same decisions in another slot of the same buffer
    # With both runs' gates (exporter.formats.graph.router_tensors): every flipped decision explained.
    gate_error: float | None = None  # max |gate - reference gate| over the layer
    flip_count: int = 0  # (token, choice) pairs whose expert or kept decision differs
    unexplained: int = 0  # flips that the two runs' gates do not explain (a routing bug): fail the check
    causes: dict[str, int] = field(default_factory=dict)  # flips per Flip.cause
    output_error_flipped: float | None = None  # largest output error of an image holding a flipped token ...
    output_error_clean: float | None = None  # ... and of an image without one (each relative to the output's scale)
    flips: list[dict] = field(default_factory=list)  # the first MAX_LISTED_FLIPS, each a Flip as a dict


@dataclass
class Flip:
    """One (token, choice) whose routing decision differs from the reference's.

    ``kind`` is ``expert`` (another expert) or ``kept`` (same expert, kept in one run and dropped in the
    other). ``margin`` is how close the reference's two competing values were: for an expert flip the
    smallest gap between two of the token's candidate experts (its choices in either run) that the two
    runs rank in opposite order; for a kept flip under Batch Prioritized Routing the gap between this
    token's priority and the nearest priority of a token in the same group. ``error`` is how far the
    graph moved those values (the two gates' deviations summed; twice the group's largest priority
    deviation). ``cause``: ``gates`` (the graph's choices are the top-k of its own gates, which rank
    two candidates in the other order, no further apart than it moved them: rounding reordered them),
    ``cascade`` (an expert flip earlier in the group moved this token's buffer position) or
    ``unexplained`` (the routing math disagrees with its own gates).
    """

    group: int
    token: int
    choice: int
    kind: str
    expert: int
    actual_expert: int
    margin: float | None
    error: float | None
    cause: str
    output_error: float | None = None  # of the image holding the token, relative to the output's scale


@dataclass
class SoftRoutingParity:
    """One Soft-MoE layer: the largest deviation of its dispatch and combine weights from the reference."""

    layer: str
    dispatch_max_abs: float
    combine_max_abs: float
    dispatch_max_rel: float  # relative to the layer's largest reference weight
    combine_max_rel: float


@dataclass
class RoundingParity:
    """An FP32 graph's bfloat16 roundings (``--bf16-dispatch``: every MoE layer's expert inputs and
    outputs) against PyTorch's, when the outputs missed FP32's tolerance.

    Rounding to bfloat16 keeps 8 significant bits, so an element within float32 noise of the midpoint
    between two bfloat16 neighbours can round up in one runtime and down in the other: one bfloat16
    step (up to 2^-7 of the element) out of a float32 difference of 1e-7. Such an element is counted
    ``at_midpoint`` when the graph's value is what some value within the tolerance's ``rtol`` (of the
    tensor's scale) of PyTorch's own rounds to; PyTorch then runs again rounding those elements as the
    graph did, and the outputs and routing are compared against that run with the unchanged
    tolerance. Any other differing element is ``unexplained`` and fails the check.
    """

    roundings: int  # rounding points compared (two per MoE layer)
    elements: int  # rounded elements, all points together
    at_midpoint: int  # elements the graph rounded to the other neighbour, within rtol of a midpoint
    unexplained: int  # elements the graph rounded to a value PyTorch's could not reach within rtol
    max_rel_before: float  # the outputs' largest relative error against PyTorch's own rounding
    passed: bool


def compare_output(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float) -> OutputParity:
    """``max|actual - expected| / max|expected|`` within ``rtol``; non-finite values must match."""
    if expected.shape != actual.shape:
        return OutputParity(name, list(actual.shape), float("inf"), float("inf"), False)
    expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
    max_abs = float(np.max(np.abs(actual64 - expected64))) if expected.size else 0.0
    scale = float(np.max(np.abs(expected64))) if expected.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    finite = bool(np.isfinite(actual64).all() == np.isfinite(expected64).all())
    return OutputParity(name, list(actual.shape), max_abs, max_rel, finite and max_rel <= rtol)


def max_rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (inf on a shape mismatch)."""
    return compare_output("", expected, actual, rtol=math.inf).max_rel


def close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> bool:
    """Float values equal to ``expected`` within ``rtol`` of its scale."""
    return bool(np.issubdtype(actual.dtype, np.floating)) and compare_output("", expected, actual, rtol).passed


MAX_LISTED_FLIPS = 100  # flips listed per layer in a report (all are counted)


def compare_routing(layer: str, expected, actual: dict[str, np.ndarray], min_agreement: float) -> RoutingParity:
    """One layer's routing outputs in ``actual`` against ``expected`` (``.expert`` and ``.slot``
    arrays, e.g. a TopKRouting); passes when the share of pairs with the same expert and kept
    decision is at least ``min_agreement``."""
    expert_name, kept_name, slot_name = routing_output_names(layer)
    e_ref, s_ref = np.asarray(expected.expert), np.asarray(expected.slot)
    k_ref = s_ref >= 0
    e_act, k_act, s_act = actual[expert_name], actual[kept_name].astype(bool), actual[slot_name]
    if e_act.shape != e_ref.shape:
        raise UserError(
            f"routing of {layer} has shape {list(e_act.shape)} in the graph but {list(e_ref.shape)} in the model; "
            "was the graph exported from this model and routing configuration?"
        )
    same_e, same_k, same_s = e_act == e_ref, k_act == k_ref, s_act == s_ref
    agreement = float(np.mean(same_e & same_k & same_s))
    decisions = float(np.mean(same_e & same_k))
    # With every expert and kept decision equal, each expert's buffer holds the same tokens in both
    # runs, so differing slots can only be a reordering of that buffer.
    swaps = int(np.sum(same_e & same_k & ~same_s)) if decisions == 1.0 else 0
    return RoutingParity(
        layer=layer,
        pairs=int(e_ref.size),
        expert=float(np.mean(same_e)),
        kept=float(np.mean(same_k)),
        slot=float(np.mean(same_s)),
        agreement=agreement,
        dropped_expected=float(np.mean(~k_ref)),
        dropped_actual=float(np.mean(~k_act)),
        passed=decisions >= min_agreement,
        decisions=decisions,
        slot_swaps=swaps,
    )


def explain_flips(
    parity: RoutingParity,
    expected,
    actual: dict[str, np.ndarray],
    gates: np.ndarray,
    actual_gates: np.ndarray,
    *,
    batch_priority: bool,
    image_errors: np.ndarray | None = None,
) -> RoutingParity:
    """Lists and explains every flipped decision of one layer (see :class:`Flip`), from both runs'
    gates ``[G, S, E]``; ``image_errors`` (one output error per image) says how far each moved the
    output. A flip the gates do not explain makes the layer fail."""
    expert_name, kept_name, _ = routing_output_names(parity.layer)
    e_ref, s_ref = np.asarray(expected.expert), np.asarray(expected.slot)
    e_act, k_act = actual[expert_name], actual[kept_name].astype(bool)
    k_ref = s_ref >= 0
    gates, actual_gates = gates.astype(np.float64), actual_gates.astype(np.float64)
    if gates.shape != actual_gates.shape or gates.shape[:2] != e_ref.shape[:2]:
        return parity
    groups, tokens, _ = gates.shape
    delta = np.abs(actual_gates - gates)
    priority, priority_error = gates.max(axis=-1), np.abs(actual_gates.max(axis=-1) - gates.max(axis=-1))
    expert_flip = e_act != e_ref
    flipped = expert_flip | (k_act != k_ref)
    images = image_errors.shape[0] if image_errors is not None else 0
    per_group = images // groups if images and images % groups == 0 else 0
    flips = []
    for g, s, c in zip(*np.nonzero(flipped)):
        e, a = int(e_ref[g, s, c]), int(e_act[g, s, c])
        if expert_flip[g, s, c]:
            kind = "expert"
            margin, error = _inverted_pair(gates[g, s], actual_gates[g, s], {*e_ref[g, s], *e_act[g, s]})
            own = np.array_equal(_top_k(actual_gates[g, s], e_act.shape[-1]), e_act[g, s])
            cause = "gates" if own and margin is not None and margin <= error + 1e-12 else "unexplained"
        else:
            kind = "kept"
            if expert_flip[g].any():
                margin, error, cause = None, None, "cascade"
            elif batch_priority:
                others = np.delete(priority[g], s)
                margin = float(np.min(np.abs(others - priority[g, s]))) if others.size else None
                error = 2 * float(priority_error[g].max())
                cause = "gates" if margin is not None and margin <= error + 1e-12 else "unexplained"
            else:  # token order and the same experts: the same positions
                margin, error, cause = None, None, "unexplained"
        image = g * per_group + s * per_group // tokens if per_group else None
        out_err = float(image_errors[image]) if image is not None else None
        flips.append(Flip(int(g), int(s), int(c), kind, e, a, _num(margin), _num(error), cause, out_err))
    parity.gate_error = float(delta.max()) if delta.size else 0.0
    parity.flip_count = len(flips)
    parity.unexplained = sum(f.cause == "unexplained" for f in flips)
    parity.causes = dict(Counter(f.cause for f in flips))
    parity.flips = [asdict(f) for f in flips[:MAX_LISTED_FLIPS]]
    parity.passed = parity.passed and parity.unexplained == 0
    if per_group:
        hit = np.zeros(images, bool)
        for f in flips:
            hit[f.group * per_group + f.token * per_group // tokens] = True
        parity.output_error_flipped = float(image_errors[hit].max()) if hit.any() else None
        parity.output_error_clean = float(image_errors[~hit].max()) if (~hit).any() else None
    return parity


def _top_k(row: np.ndarray, k: int) -> np.ndarray:
    """The k best experts of one token's gates, ties to the lower index (as the routing's ArgMax steps)."""
    order = sorted(range(row.shape[0]), key=lambda i: (-row[i], i))
    return np.asarray(order[:k])


def _inverted_pair(ref: np.ndarray, act: np.ndarray, experts) -> tuple[float | None, float | None]:
    """(margin, error) of the closest pair of ``experts`` the two gate rows rank in opposite order."""
    rank = lambda row, i: (-row[i], i)  # noqa: E731
    best = (None, None)
    experts = sorted(int(x) for x in experts)
    for i, u in enumerate(experts):
        for v in experts[i + 1 :]:
            if (rank(ref, u) < rank(ref, v)) != (rank(act, u) < rank(act, v)):
                margin, error = abs(ref[u] - ref[v]), abs(act[u] - ref[u]) + abs(act[v] - ref[v])
                if best[0] is None or margin < best[0]:
                    best = (margin, error)
    return best


def _num(value) -> float | None:
    return None if value is None else float(value)


def image_errors(expected: np.ndarray, actual: np.ndarray) -> np.ndarray | None:
    """Each image's ``max|actual - expected|`` over the output's ``max|expected|`` (batch-first outputs)."""
    if expected.shape != actual.shape or expected.ndim < 1 or not expected.size:
        return None
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    scale = float(np.max(np.abs(e))) or 1.0
    return np.abs(a - e).reshape(e.shape[0], -1).max(axis=1) / scale


def compare_soft_routing(
    layer: str, expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]
) -> SoftRoutingParity:
    """The largest deviation of one Soft-MoE layer's dispatch and combine weights (any layout of the
    same elements is compared as the reference's)."""
    out = {}
    for kind in ("dispatch", "combine"):
        e = expected[kind].astype(np.float64)
        a = actual[kind].astype(np.float64).reshape(e.shape)
        diff = float(np.max(np.abs(a - e))) if e.size else 0.0
        out[kind] = (diff, diff / (float(np.max(np.abs(e))) or 1.0))
    return SoftRoutingParity(layer, out["dispatch"][0], out["combine"][0], out["dispatch"][1], out["combine"][1])
