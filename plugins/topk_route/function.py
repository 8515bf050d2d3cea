"""``moe::TopKRoute`` as standard ONNX ops (the model-local function beside every plugin node).

The same static formulation as ``exporter.models.routing.route_top_k``: TopK over the experts (ONNX TopK puts
the lower index first on ties, like ``jax.lax.top_k``), buffer positions as matmuls of 0/1 matrices,
and the slot table as a ScatterElements without reduction. The capacity is the ``capacity`` attribute,
or (0) the ``cap_*`` rule of the group size in int64 arithmetic (``plugins.topk_route.capacity``).
"""

from __future__ import annotations

import onnx

from plugins.onnx_function import BOOL, FLOAT, INT32, INT64, FunctionBuilder
from plugins.topk_route.spec import DEFAULTS

NAME = "TopKRoute"


def _capacity(b: FunctionBuilder, tokens: str) -> str:
    """The ``capacity`` attribute, or when it is 0 the ``cap_*`` rule of ``tokens`` (int64 scalars)."""
    one = b.scalar(1)

    def cdiv(a: str, d: str) -> str:
        return b.op("Div", b.op("Add", a, b.op("Sub", d, one)), d)

    num, den, pre, mul, align = (b.attr_int(f"cap_{n}") for n in ("num", "den", "pre", "mul", "align"))
    scaled = b.op("Mul", cdiv(tokens, pre), num)
    rounded = b.op("Where", b.op("Cast", b.attr_int("cap_ceil"), to=BOOL), cdiv(scaled, den), b.op("Div", scaled, den))
    aligned = b.op("Mul", cdiv(b.op("Mul", rounded, mul), align), align)
    clamped = b.op("Where", b.op("Cast", b.attr_int("cap_clamp"), to=BOOL), b.op("Min", aligned, tokens), aligned)
    rule = b.op("Max", clamped, b.attr_int("cap_min"))
    fixed = b.attr_int("capacity")
    return b.op("Where", b.op("Greater", fixed, b.scalar(0)), fixed, rule)


def function() -> onnx.FunctionProto:
    b = FunctionBuilder(
        NAME,
        ["gates"],
        ["expert", "slot", "weight", "slot_token"],
        {"k": 2, "capacity": 1, "batch_priority": 0, **DEFAULTS},
    )
    k, bpr = b.attr_int("k"), b.attr_int("batch_priority")
    zero, one = b.scalar(0), b.scalar(1)
    groups, tokens, experts = (b.dim("gates", axis) for axis in range(3))
    capacity = _capacity(b, tokens)

    top_gate, top_expert = b.op(
        "TopK", "gates", b.op("Reshape", k, b.ints([1])), axis=-1, largest=1, sorted=1, outputs=2
    )
    expert_ids = b.op("Range", zero, experts, one)
    choice = b.op("Cast", b.op("Equal", b.op("Unsqueeze", top_expert, b.ints([-1])), expert_ids), to=FLOAT)  # GSKE

    # before[g, i, j] = 1 when token j takes a slot before token i (same pass).
    token_ids = b.op("Range", zero, tokens, one)
    earlier = b.op("Less", b.op("Unsqueeze", token_ids, b.ints([0])), b.op("Unsqueeze", token_ids, b.ints([1])))
    priority = b.op("Gather", top_gate, zero, axis=2)  # [G, S]: the top-1 gate
    p_i, p_j = b.op("Unsqueeze", priority, b.ints([2])), b.op("Unsqueeze", priority, b.ints([1]))
    by_priority = b.op("Or", b.op("Greater", p_j, p_i), b.op("And", b.op("Equal", p_j, p_i), earlier))
    by_priority, earlier = b.op("Cast", by_priority, to=FLOAT), b.op("Cast", earlier, to=FLOAT)
    before = b.op("Where", b.op("Cast", bpr, to=BOOL), by_priority, earlier)  # [G, S, S]

    # pass by pass: the same pass's choices of tokens before, plus every choice of the earlier passes
    flat = b.shape(groups, tokens, b.op("Mul", k, experts))
    same_pass = b.op("Reshape", b.op("MatMul", before, b.op("Reshape", choice, flat)), b.op("Shape", choice))
    per_pass = b.op("ReduceSum", choice, b.ints([1]), keepdims=0)  # [G, K, E]
    pass_ids = b.op("Range", zero, k, one)
    lower = b.op(
        "Cast",
        b.op("Less", b.op("Unsqueeze", pass_ids, b.ints([0])), b.op("Unsqueeze", pass_ids, b.ints([1]))),
        to=FLOAT,
    )
    earlier_passes = b.op("Unsqueeze", b.op("MatMul", lower, per_pass), b.ints([1]))  # [G, 1, K, E]
    by_pass = b.op("Add", same_pass, earlier_passes)
    # token by token: every choice (any pass) of the tokens before
    any_pass = b.op("ReduceSum", choice, b.ints([2]), keepdims=0)  # [G, S, E]
    by_token = b.op("Unsqueeze", b.op("MatMul", before, any_pass), b.ints([2]))  # [G, S, 1, E]
    position = b.op("Where", b.op("Cast", b.attr_int("by_token"), to=BOOL), by_token, by_pass)
    position = b.op("Mul", position, choice)
    position = b.op("Cast", b.op("ReduceSum", position, b.ints([3]), keepdims=0), to=INT64)  # [G, S, K]

    kept = b.op("Less", position, capacity)
    flat_slot = b.op("Add", b.op("Mul", top_expert, capacity), position)
    b.op("Cast", top_expert, to=INT32, outputs=["expert"])
    b.op("Cast", b.op("Where", kept, flat_slot, b.scalar(-1)), to=INT32, outputs=["slot"])
    b.op("Where", kept, _weight(b, top_gate, kept), b.scalar(0.0), outputs=["weight"])

    # slot_token: every kept choice writes its token index to its slot; dropped ones to a spare slot.
    slots = b.op("Mul", experts, capacity)
    target = b.op("Where", kept, flat_slot, slots)
    per_group = b.shape(groups, b.op("Mul", tokens, k))
    table = b.op("Expand", b.scalar(-1), b.shape(groups, b.op("Add", slots, one)))
    token_of = b.op("Expand", b.op("Unsqueeze", token_ids, b.ints([0, 2])), b.op("Shape", target))
    table = b.op(
        "ScatterElements", table, b.op("Reshape", target, per_group), b.op("Reshape", token_of, per_group), axis=1
    )
    table = b.op("Slice", table, b.ints([0]), b.op("Reshape", slots, b.ints([1])), b.ints([1]))
    b.op("Cast", table, to=INT32, outputs=["slot_token"])
    return b.build()


def _weight(b: FunctionBuilder, gate: str, kept: str) -> str:
    """The combine weight of each chosen gate, per ``normalize`` (``spec.NORMALIZE``), before dropping."""
    normalize, eps = b.attr_int("normalize"), b.attr_float("eps")
    chosen = b.op("ReduceSum", gate, b.ints([2]), keepdims=1)
    kept_sum = b.op("ReduceSum", b.op("Where", kept, gate, b.scalar(0.0)), b.ints([2]), keepdims=1)
    denominator = b.op(
        "Where",
        b.op("Equal", normalize, b.scalar(1)),
        b.op("Add", chosen, eps),
        b.op("Max", b.op("Where", b.op("Equal", normalize, b.scalar(3)), kept_sum, chosen), eps),
    )
    return b.op("Where", b.op("Equal", normalize, b.scalar(0)), gate, b.op("Div", gate, denominator))
