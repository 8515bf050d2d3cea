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
from dataclasses import dataclass
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
