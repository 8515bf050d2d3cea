"""Output shapes and types of ``moe::TopKRoute``, written once for every evaluator: ints, TensorRT's
QDP ``ShapeExpr``s (``trt.py``) and the V3 plugins' expressions (``plugins.v3``). Dimensions are
combined with ``+ - * //`` only, the dimension on the left of an int, and with the evaluator's own
``smax``/``smin`` (what each evaluator takes); the slot table's width follows the capacity rule
(``plugins.topk_route.capacity``), so it may follow the group size."""

from __future__ import annotations

from plugins.topk_route.capacity import capacity


def output_dtypes(dtypes, **attrs) -> tuple[str, ...]:
    """(expert, slot, weight, slot_token) from the gates' dtype (always float32)."""
    return ("int32", "int32", "float32", "int32")


def output_shapes(shapes, *, smax=max, smin=min, **attrs) -> tuple[tuple, ...]:
    """Per (token, choice) ``[G, S, k]`` three times, and the slot table ``[G, E*C]``, from gates ``[G, S, E]``."""
    groups, tokens, experts = shapes[0]
    slots = capacity(tokens, attrs, smax=smax, smin=smin)
    per_choice = (groups, tokens, attrs["k"])
    return (per_choice, per_choice, per_choice, (groups, experts * slots))
