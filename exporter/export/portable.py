"""What "portable" means for an exported graph: standard ONNX ops that TensorRT parses and runs well.

Each rule names the TensorRT or ONNX issue behind it; ``check_portable`` returns one line per finding.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

# Standard-domain ops the exporter may emit for these models; all are parsed by TensorRT >= 10.3
# (QuantizeLinear/DequantizeLinear: the explicit INT8/FP8 of export --precision int8|fp8|w8|w4).
ALLOWED_OPS = frozenset(
    """
    Abs Add And ArgMax ArgMin Cast Clip Concat Constant ConstantOfShape Conv Cos DequantizeLinear Div Equal Erf Exp
    Expand Flatten Gather GatherElements Gemm Greater GreaterOrEqual Identity LayerNormalization Less
    LessOrEqual Log MatMul Max Min Mul Neg Not Or Pow QuantizeLinear Range Reciprocal ReduceMax ReduceMean ReduceMin
    ReduceSum Relu Reshape ScatterElements ScatterND Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze
    Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor
    """.split()
)

# Ops that are standard ONNX but that TensorRT handles badly or wrongly: the reason is reported.
FORBIDDEN_OPS = {
    "NonZero": "data-dependent output shape (slow, fragile data-dependent-shape support in TensorRT)",
    "Unique": "data-dependent output shape",
    "Compress": "data-dependent output shape",
    "Loop": "control flow; a traced loop freezes routing decisions",
    "If": "control flow on tensor values",
    "Scan": "control flow",
    "CumSum": "TensorRT >= 10.8 gives wrong results with several CumSums in one graph (onnx-tensorrt#1034)",
    "OneHot": "use an Equal against a Range instead (NVIDIA/TensorRT#2279)",
    "Einsum": "TensorRT's Einsum is restricted; use MatMul",
}
MAX_TOPK = 3840  # NVIDIA/TensorRT#4244

# The allow-list against a real parser: TensorRT for RTX 1.7's ONNX parser parses every op of
# ALLOWED_OPS (tests/exporter/export/test_portable.py parses a one-op graph of each, and every zoo
# graph). Where it and the rules above differ, the rule stands for the reason it gives, which a parse
# cannot see (wrong results, control flow, one-hot sizes, full TensorRT's limits); the tests check
# each verdict, so a parser that changes its mind is noticed.
RTX_PARSER_DIFFERENCES = {
    "CumSum": "parses; forbidden for full TensorRT's wrong results with several CumSums",
    "Einsum": "parses (three inputs too); forbidden for full TensorRT's restricted Einsum",
    "OneHot": "parses; forbidden: an Equal against a Range is what TensorRT handles well",
    "If": "parses; forbidden: control flow on tensor values",
    "Loop": "parses; forbidden: a traced loop freezes routing decisions",
    "Scan": "parses; forbidden: control flow",
    "TopK": f"parses with k > {MAX_TOPK}; refused above it for full TensorRT's limit",
    "NonZero": "refused too: TensorRT for RTX registers no NonZero plugin",
    "Unique": "refused too",
    "Compress": "refused too",
}


def _initializer_values(graph: onnx.GraphProto) -> dict:
    values = {}
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and init.dims in ([], [1]):
            values[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def check_portable(model: onnx.ModelProto) -> list[str]:
    """Findings that make a graph non-portable to TensorRT; empty when it is portable."""
    findings = []
    graph = model.graph
    constants = _initializer_values(graph)
    for node in graph.node:
        where = f"{node.op_type} node {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            findings.append(f"{where}: custom domain {node.domain!r}")
            continue
        if node.op_type in FORBIDDEN_OPS:
            findings.append(f"{where}: {FORBIDDEN_OPS[node.op_type]}")
            continue
        if node.op_type not in ALLOWED_OPS:
            findings.append(f"{where}: not on the allow-list of TensorRT-friendly ops")
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("ScatterElements", "ScatterND") and attrs.get("reduction", b"none") not in (
            b"none",
            "none",
        ):
            findings.append(f"{where}: scatter with reduction (TensorRT's IScatterLayer has none)")
        if node.op_type == "TopK":
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                findings.append(f"{where}: k is not a constant")
            elif int(k.reshape(-1)[0]) > MAX_TOPK:
                findings.append(f"{where}: k={int(k.reshape(-1)[0])} > {MAX_TOPK}")
    return findings
