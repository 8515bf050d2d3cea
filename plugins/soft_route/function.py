"""``moe::SoftRoute`` as standard ONNX ops: both softmaxes of one logits tensor."""

from __future__ import annotations

import onnx

from plugins.onnx_function import FunctionBuilder

NAME = "SoftRoute"


def function() -> onnx.FunctionProto:
    b = FunctionBuilder(NAME, ["logits"], ["dispatch", "combine"], {})
    b.op("Softmax", "logits", axis=1, outputs=["dispatch"])  # over the tokens of an image
    b.op("Softmax", "logits", axis=2, outputs=["combine"])  # over all slots
    return b.build()
