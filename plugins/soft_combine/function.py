"""``moe::SoftCombine`` as standard ONNX ops: tokens = combine·slot outputs per image."""

from __future__ import annotations

import onnx

from plugins.onnx_function import FunctionBuilder

NAME = "SoftCombine"


def function() -> onnx.FunctionProto:
    b = FunctionBuilder(NAME, ["slot_out", "combine"], ["y"], {"num_experts": 1, "expert_major": 1})
    experts, major = b.attr_int("num_experts"), b.attr_int("expert_major")
    images, slots = b.dim("combine", 0), b.dim("combine", 2)
    dim = b.dim("slot_out", 2)
    minor = b.op("Sub", b.scalar(1), major)
    pick = lambda when_major, otherwise: b.op("Add", b.op("Mul", major, when_major), b.op("Mul", minor, otherwise))  # noqa: E731
    n_, p_ = pick(experts, b.scalar(1)), pick(b.op("Div", slots, experts), slots)
    # expert_major=1: [n, B*p, D] -> [B, n, p, D]; expert_major=0: [1, B, S, D] -> [B, 1, S, D] (no move).
    outputs = b.op("Transpose", b.op("Reshape", "slot_out", b.shape(n_, images, p_, dim)), perm=[1, 0, 2, 3])
    outputs = b.op("Reshape", outputs, b.shape(images, slots, dim))
    # as the kernel: accumulated in float32, the result in the slot outputs' type
    b.op("CastLike", b.op("MatMul", "combine", b.op("CastLike", outputs, "combine")), "slot_out", outputs=["y"])
    return b.build()
