"""``moe::TopKCombine`` as standard ONNX ops: per token, a Gather of its k slots and a k-term dot product."""

from __future__ import annotations

import onnx

from plugins.onnx_function import INT64, FunctionBuilder

NAME = "TopKCombine"


def function() -> onnx.FunctionProto:
    b = FunctionBuilder(NAME, ["expert_out", "slot", "weight"], ["y"], {})
    zero, one = b.scalar(0), b.scalar(1)
    rows_per_expert, dim = b.dim("expert_out", 1), b.dim("expert_out", 2)
    groups, tokens, k = (b.dim("slot", axis) for axis in range(3))
    capacity = b.op("Div", rows_per_expert, groups)  # the expert buffers hold G*C rows

    slot = b.op("Cast", "slot", to=INT64)
    kept = b.op("GreaterOrEqual", slot, zero)
    slot = b.op("Max", slot, zero)
    expert, position = b.op("Div", slot, capacity), b.op("Mod", slot, capacity)
    group_base = b.op("Mul", b.op("Reshape", b.op("Range", zero, groups, one), b.ints([-1, 1, 1])), capacity)
    row = b.op("Add", b.op("Add", b.op("Mul", expert, rows_per_expert), group_base), position)
    picked = b.op(
        "Gather", b.op("Reshape", "expert_out", b.shape(b.scalar(-1), dim)), b.op("Reshape", row, b.ints([-1])), axis=0
    )
    rows = b.op("Mul", groups, tokens)
    picked = b.op("Reshape", picked, b.shape(rows, k, dim))
    weight = b.op("Reshape", b.op("Where", kept, "weight", b.scalar(0.0)), b.shape(rows, one, k))
    # as the kernel: accumulated in float32, the result in the expert outputs' type
    mixed = b.op("CastLike", b.op("MatMul", weight, b.op("CastLike", picked, "weight")), "expert_out")
    b.op("Reshape", mixed, b.shape(groups, tokens, dim), outputs=["y"])
    return b.build()
