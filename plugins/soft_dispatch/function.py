"""``moe::SoftDispatch`` as standard ONNX ops: slots = dispatchᵀ·x per image, image- or expert-major."""

from __future__ import annotations

import onnx

from plugins.onnx_function import FunctionBuilder

NAME = "SoftDispatch"


def function() -> onnx.FunctionProto:
    b = FunctionBuilder(NAME, ["x", "dispatch"], ["slots"], {"num_experts": 1, "expert_major": 1})
    experts, major = b.attr_int("num_experts"), b.attr_int("expert_major")
    images, dim = b.dim("x", 0), b.dim("x", 2)
    slots = b.dim("dispatch", 2)
    # as the kernel: the tokens' products accumulated in float32, the result in the tokens' type
    weights = b.op("Transpose", "dispatch", perm=[0, 2, 1])
    mixed = b.op("CastLike", b.op("MatMul", weights, b.op("CastLike", "x", "dispatch")), "x")  # [B, S, D]
    # expert_major=1: [B, n, p, D] -> [n, B*p, D]; expert_major=0: [B, 1, S, D] -> [B, S, D] (no move).
    minor = b.op("Sub", b.scalar(1), major)
    pick = lambda when_major, otherwise: b.op("Add", b.op("Mul", major, when_major), b.op("Mul", minor, otherwise))  # noqa: E731
    per_expert = b.op("Div", slots, experts)
    n_, p_ = pick(experts, b.scalar(1)), pick(per_expert, slots)
    moved = b.op("Transpose", b.op("Reshape", mixed, b.shape(images, n_, p_, dim)), perm=[1, 0, 2, 3])
    out = b.shape(pick(experts, images), pick(b.op("Mul", images, per_expert), slots), dim)
    b.op("Reshape", moved, out, outputs=["slots"])
    return b.build()
