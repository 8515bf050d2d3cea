"""Running BF16 graphs on a CPU: ONNX Runtime's CPU provider has no BFLOAT16 kernels (MatMul, Add,
Tanh and Softmax are refused), so ``emulated`` makes an FP32 copy of the graph in which every tensor
the graph stores in BFLOAT16 is rounded to BFLOAT16 where it is made.

How faithful that is: each op computes in FP32 on BF16-representable inputs and its result is rounded
to BF16 (round to nearest even, the Cast's own rounding) before anything reads it. That is what a GPU's
BF16 kernels do (FP32 accumulation, BF16 storage); what it cannot model is a fused kernel that skips
the rounding of an intermediate tensor, and the order of the FP32 accumulation. The same emulation of
an FP16 graph, compared with ONNX Runtime's own FP16 run, measures it (``benchmarks/precision.py``).
Weights are stored BF16 and converted to FP32 exactly; the graph's input and outputs are unchanged.

FP8 graphs (``export --precision fp8``: QuantizeLinear/DequantizeLinear pairs to FLOAT8E4M3FN) run the
same way: each weight is dequantized once, exactly (its FP8 values through ``ml_dtypes``, times its
scales), and each activation's Q/DQ pair becomes ``x / scale``, a Cast to FLOAT8E4M3FN (round to nearest
even, saturating at 448, the QuantizeLinear's own rounding) and back, times the scale: the arithmetic
of a Q/DQ pair in FP32, so a CPU runs FP8 graphs whatever its ONNX Runtime's FP8 kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.external_data import set_base_dir

from exporter.formats.graph import precision
from exporter.settings import Precision, RoutingPrecision

EMULATED = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16, ir.DataType.FLOAT8E4M3FN)


def emulation_type(model: onnx.ModelProto) -> ir.DataType | None:
    """The type a CPU run must emulate, or None to run the graph as it is.

    BFLOAT16 when a node other than a Cast computes on it (ONNX Runtime has no kernels for it).
    FLOAT16 when the routing itself is FP16 (``export --routing-precision reduced``): ONNX Runtime
    computes ops that lack FP16 kernels (ArgMax, the masking Where, ...) in FP32 and can skip the
    rounding of their FP16 inputs, so its routing would read other gates than the graph's own; the
    emulation makes every reader see the rounded tensor. FP16 graphs with FP32 routing run natively.
    FLOAT8E4M3FN when the graph stores FP8 weights (``export --precision fp8``)."""
    if any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer):
        return ir.DataType.FLOAT8E4M3FN
    if needs_emulation(model):
        return ir.DataType.BFLOAT16
    if precision(model) == (Precision.FP16, RoutingPrecision.REDUCED) and needs_emulation(
        model, onnx.TensorProto.FLOAT16
    ):
        return ir.DataType.FLOAT16
    return None


def needs_emulation(model: onnx.ModelProto, dtype: int = onnx.TensorProto.BFLOAT16) -> bool:
    """Whether a node other than a Cast computes on ``dtype`` tensors (read from the graph's value
    types and initializers, without the weights)."""
    typed = {v.name for v in [*model.graph.value_info, *model.graph.input] if v.type.tensor_type.elem_type == dtype}
    typed |= {t.name for t in model.graph.initializer if t.data_type == dtype}
    return any(n.op_type not in ("Cast", "Shape") and any(i in typed for i in n.input) for n in model.graph.node)


def emulated(model: onnx.ModelProto, dtype: ir.DataType = ir.DataType.BFLOAT16) -> onnx.ModelProto:
    """An FP32 copy of ``model`` (weights loaded) whose ``dtype`` tensors are FP32 tensors rounded to
    ``dtype`` after the node that makes them; value names are kept, so any tensor can be read."""
    m = ir.from_proto(_typed_outputs(model))
    _emulate(m, dtype)
    return ir.to_proto(m)


def emulated_file(path: str | Path, folder: Path, dtype: ir.DataType = ir.DataType.BFLOAT16) -> Path:
    """``emulated`` for a graph file whose weights lie beside it (a big model): its weights are read
    and converted one at a time as ``folder/emulated.onnx`` and its weights file are written."""
    path = Path(path)
    header = _typed_outputs(onnx.load(str(path), load_external_data=False))
    m = ir.from_proto(header)
    set_base_dir(m.graph, path.parent)
    _emulate(m, dtype)
    dest = folder / "emulated.onnx"
    ir.save(m, str(dest), external_data="emulated.onnx.data")
    return dest


def _typed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """An output declared without a type (a tensor exposed for reading) takes its value's type, so
    that it is emulated like the rest."""
    known = {v.name: v for v in model.graph.value_info if v.type.HasField("tensor_type")}
    untyped = [i for i, v in enumerate(model.graph.output) if not v.type.HasField("tensor_type") and v.name in known]
    if not untyped:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i in untyped:
        copy.graph.output[i].CopyFrom(known[copy.graph.output[i].name])
    return copy


def _as_float(tensor) -> ir.LazyTensor:
    """The tensor as FP32, converted when it is read (exactly: every BF16/FP16 value is an FP32 one)."""
    return ir.LazyTensor(
        lambda: ir.tensor(tensor.numpy().astype("float32"), name=tensor.name),
        ir.DataType.FLOAT,
        tensor.shape,
        name=tensor.name,
    )


def _emulate(m: ir.Model, dtype: ir.DataType) -> None:
    if dtype == ir.DataType.FLOAT8E4M3FN:
        _emulate_qdq(m.graph, dtype)
        return
    graph = m.graph
    for value in graph.inputs:
        if value.dtype == dtype:
            raise ValueError(f"input {value.name} is {dtype.name}; emulation keeps the graph's inputs")
    for value in graph.initializers.values():
        if value.dtype == dtype and value.const_value is not None:
            value.const_value = _as_float(value.const_value)
            value.dtype = ir.DataType.FLOAT
    for node in list(graph):
        if node.op_type == "Cast" and node.attributes["to"].value == dtype:
            node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype == dtype:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype("float32")))
        for out in node.outputs:
            if out.dtype != dtype:
                continue
            out.dtype = ir.DataType.FLOAT
            if node.op_type == "Constant":  # exactly representable already
                continue
            uses, name = list(out.uses()), out.name
            out.name = f"{name}.unrounded"
            mid = ir.Value(name=f"{name}.rounding", type=ir.TensorType(dtype), shape=out.shape)
            rounded = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=out.shape)
            pair = [
                ir.Node("", "Cast", [out], [ir.AttrInt64("to", dtype)], outputs=[mid], name=f"{name}.round"),
                ir.Node("", "Cast", [mid], [ir.AttrInt64("to", ir.DataType.FLOAT)], outputs=[rounded]),
            ]
            graph.insert_after(node, pair)
            for user, index in uses:
                user.replace_input_with(index, rounded)
            for i, value in enumerate(graph.outputs):
                if value is out:
                    graph.outputs[i] = rounded


def _broadcast(scale: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A per-axis scale shaped to broadcast against a tensor of ``rank`` along ``axis``."""
    if scale.ndim != 1 or rank <= 1:
        return scale
    shape = [1] * rank
    shape[axis % rank] = -1
    return scale.reshape(shape)


def _emulate_qdq(graph: ir.Graph, dtype: ir.DataType) -> None:
    """Q/DQ pairs of ``dtype`` as FP32 arithmetic with a Cast pair, and ``dtype`` weights dequantized."""
    for node in list(graph):
        if node.graph is None:  # the DequantizeLinear of a pair already replaced
            continue
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            stored = node.inputs[0].const_value.numpy()
            if node.inputs[0].dtype != dtype:
                continue
            axis = node.attributes["axis"].value if "axis" in node.attributes else 1
            scale = _broadcast(node.inputs[1].const_value.numpy(), axis, stored.ndim)
            out = node.outputs[0]
            folded = ir.Value(name=f"{out.name}.emulated", type=ir.TensorType(ir.DataType.FLOAT), shape=out.shape)
            folded.const_value = ir.tensor((stored.astype(np.float32) * scale).astype(np.float32), name=folded.name)
            graph.register_initializer(folded)
            for user, index in list(out.uses()):
                user.replace_input_with(index, folded)
            graph.remove(node, safe=True)
        elif node.op_type == "QuantizeLinear" and node.outputs[0].dtype == dtype:
            (dq, _), *_ = list(node.outputs[0].uses())
            x, out = node.inputs[0], dq.outputs[0]
            axis = node.attributes["axis"].value if "axis" in node.attributes else 1
            scale = node.inputs[1].const_value.numpy().astype(np.float32)
            name = out.name
            sv = ir.Value(name=f"{name}.scale", type=ir.TensorType(ir.DataType.FLOAT))
            sv.const_value = ir.tensor(_broadcast(scale, axis, len(x.shape) if x.shape is not None else 1))
            graph.register_initializer(sv)

            def value(suffix, value_type=ir.DataType.FLOAT, name=name, shape=x.shape):
                return ir.Value(name=f"{name}.{suffix}", type=ir.TensorType(value_type), shape=shape)

            scaled, rounded, back = value("scaled"), value("fp8", dtype), value("rounded")
            new = [
                ir.Node("", "Div", [x, sv], outputs=[scaled]),
                ir.Node(
                    "", "Cast", [scaled], [ir.AttrInt64("to", dtype), ir.AttrInt64("saturate", 1)], outputs=[rounded]
                ),
                ir.Node("", "Cast", [rounded], [ir.AttrInt64("to", ir.DataType.FLOAT)], outputs=[back]),
                ir.Node(
                    "",
                    "Mul",
                    [back, sv],
                    outputs=[ir.Value(name=f"{name}.emulated", type=ir.TensorType(ir.DataType.FLOAT))],
                ),
            ]
            graph.insert_before(node, new)
            for user, index in list(out.uses()):
                user.replace_input_with(index, new[-1].outputs[0])
            graph.remove([dq, node], safe=True)
    for name, value in list(graph.initializers.items()):  # the FP8 weights, scales and zero points replaced
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
