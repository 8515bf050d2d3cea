"""``moe::TopKDispatch`` as standard ONNX ops: one Gather of the token in every buffer slot."""

from __future__ import annotations

import onnx

from plugins.onnx_function import INT64, FunctionBuilder, float_zero_like

NAME = "TopKDispatch"


def function() -> onnx.FunctionProto:
    b = FunctionBuilder(NAME, ["x", "slot_token"], ["expert_in"], {"num_experts": 1})
    experts = b.attr_int("num_experts")
    zero, one = b.scalar(0), b.scalar(1)
    groups, tokens, dim = (b.dim("x", axis) for axis in range(3))
    slots = b.dim("slot_token", 1)
    capacity = b.op("Div", slots, experts)

    token = b.op("Cast", "slot_token", to=INT64)  # [G, E*C]
    offset = b.op("Unsqueeze", b.op("Mul", b.op("Range", zero, groups, one), tokens), b.ints([1]))
    rows = b.op("Reshape", b.op("Add", b.op("Max", token, zero), offset), b.ints([-1]))
    picked = b.op("Gather", b.op("Reshape", "x", b.shape(b.scalar(-1), dim)), rows, axis=0)  # [G*E*C, D]
    filled = b.op("Reshape", b.op("GreaterOrEqual", token, zero), b.ints([-1, 1]))
    picked = b.op("Where", filled, picked, float_zero_like(b, "x"))
    picked = b.op("Transpose", b.op("Reshape", picked, b.shape(groups, experts, capacity, dim)), perm=[1, 0, 2, 3])
    b.op("Reshape", picked, b.shape(experts, b.op("Mul", groups, capacity), dim), outputs=["expert_in"])
    return b.build()
