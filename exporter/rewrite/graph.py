"""graphsurgeon helpers the matchers share: walking reshapes, cutting tensors loose, emitting plugin nodes."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from exporter import settings
from exporter.compare import close as _close_to
from exporter.formats.graph import MIX_OPS, SHAPE_OPS
from exporter.rewrite.plan import Decline, PluginNode
from exporter.settings import Precision
from plugins import registry
from plugins.onnx_function import PARSER_ATTRIBUTES

# what a softmax output may pass through on its way to the mix: reshapes, and in a reduced-precision
# graph the Cast from the FP32 routing to the reduced type (exporter.export.precision)
TO_MIX_OPS = SHAPE_OPS | {"Cast"}


@contextlib.contextmanager
def quiet_graphsurgeon():
    """onnx-graphsurgeon warns on stdout, e.g. that BFLOAT16 has no NumPy type (it keeps the ONNX type,
    which is all the rewrite needs): only its errors get through, without colours."""
    from onnx_graphsurgeon.logger import G_LOGGER

    saved = G_LOGGER.severity, G_LOGGER.colors
    G_LOGGER.severity, G_LOGGER.colors = G_LOGGER.ERROR, False
    try:
        yield
    finally:
        G_LOGGER.severity, G_LOGGER.colors = saved


def is_var(t) -> bool:
    return isinstance(t, gs.Variable)


def is_const(t) -> bool:
    """An initializer or a Constant node's output, or a weight dequantized from one (``dequantized_weight``)."""
    if isinstance(t, gs.Constant):
        return True
    node = producer(t) if isinstance(t, gs.Variable) else None
    return node is not None and (node.op == "Constant" or dequantized_weight(t))


def dequantized_weight(t) -> bool:
    """A quantized graph's weight (``export --precision int8|fp8|w8|w4``): a DequantizeLinear of a stored
    constant, possibly reshaped and transposed back to the weight's shape."""
    node = producer(t) if isinstance(t, gs.Variable) else None
    while node is not None and node.op in ("Reshape", "Transpose") and isinstance(node.inputs[0], gs.Variable):
        node = producer(node.inputs[0])
    return node is not None and node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant)


def const_shape(t) -> tuple | None:
    """The shape of a constant tensor without reading its data (weights may live in another file)."""
    if isinstance(t, gs.Constant):
        return tuple(t.shape)
    node = producer(t) if isinstance(t, gs.Variable) else None
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return tuple(value.shape if isinstance(value, gs.Constant) else np.shape(value))
    if dequantized_weight(t) and t.shape is not None and all(isinstance(d, int) for d in t.shape):
        return tuple(t.shape)
    return None


def const_value(t, limit: int = 64) -> np.ndarray | None:
    """The value of a small constant tensor (at most ``limit`` elements: a scalar, an axes list), else None."""
    shape = const_shape(t)
    if shape is None or math.prod(shape) > limit:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    value = producer(t).attrs["value"]
    return np.asarray(value.values if isinstance(value, gs.Constant) else value)


@dataclass(frozen=True)
class SoftmaxMatch:
    """A softmax in a graph: an ONNX Softmax, or one written by hand (``exp(x - max) / sum(exp)``)."""

    node: gs.Node  # the Softmax, or the final Div
    input: gs.Variable
    output: gs.Variable
    axes: tuple[int, ...]  # non-negative, sorted
    rank: int | None

    @property
    def last_axis(self) -> bool:
        return self.rank is not None and self.axes == (self.rank - 1,)

    @property
    def trailing(self) -> bool:
        """Normalises the trailing axes (a last axis, or a flattened ``[n, p]`` pair)."""
        return self.rank is not None and self.axes == tuple(range(self.rank - len(self.axes), self.rank))


def _axes(node: gs.Node, rank: int | None) -> tuple[int, ...] | None:
    if node.op == "Softmax":
        axes = [node.attrs.get("axis", -1)]
    elif len(node.inputs) > 1 and node.inputs[1] is not None and (v := const_value(node.inputs[1])) is not None:
        axes = [int(a) for a in np.asarray(v).reshape(-1)]
    elif "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    else:
        return None
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a % rank for a in axes]
    return tuple(sorted(axes))


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if getattr(t, "shape", None) is not None else None


def softmaxes(graph: gs.Graph) -> list[SoftmaxMatch]:
    """Every softmax of the graph: Softmax nodes, and ``Div(Exp(x [- ReduceMax(x)]), ReduceSum(Exp(..)))``
    over the same axes (kept dimensions), as authors who write their own (bwconrad's soft-moe) do."""
    found = []
    for node in graph.nodes:
        if node.op == "Softmax" and is_var(node.inputs[0]):
            rank = _rank(node.inputs[0])
            axes = _axes(node, rank)
            if axes is not None:
                found.append(SoftmaxMatch(node, node.inputs[0], node.outputs[0], axes, rank))
        elif node.op == "Div" and all(is_var(i) for i in node.inputs):
            num, den = node.inputs
            exp, total = producer(num), producer(den)
            if exp is None or total is None or exp.op != "Exp" or total.op != "ReduceSum" or total.inputs[0] is not num:
                continue
            if not total.attrs.get("keepdims", 1):
                continue
            x = exp.inputs[0]
            shift = producer(x)
            if shift is not None and shift.op == "Sub":
                top = producer(shift.inputs[1])
                if top is not None and top.op == "ReduceMax" and top.inputs[0] is shift.inputs[0]:
                    x = shift.inputs[0]
            rank = _rank(x)
            axes = _axes(total, rank)
            if axes is not None:
                found.append(SoftmaxMatch(node, x, node.outputs[0], axes, rank))
    return found


def producer(t: gs.Tensor):
    return t.inputs[0] if t.inputs else None


def back_chain(t: gs.Tensor) -> list[gs.Tensor]:
    """``t`` and the tensors it was reshaped or transposed from, nearest first."""
    chain = [t]
    while (node := producer(chain[-1])) is not None and node.op in SHAPE_OPS and is_var(node.inputs[0]):
        chain.append(node.inputs[0])
    return chain


def forward_chain(t: gs.Tensor, graph: gs.Graph) -> list[gs.Tensor]:
    """``t`` and what it is only reshaped or transposed into (single consumers, not graph outputs)."""
    chain = [t]
    outputs = set(map(id, graph.outputs))
    while True:
        last = chain[-1]
        if id(last) in outputs or len(last.outputs) != 1:
            return chain
        node = last.outputs[0]
        if node.op not in SHAPE_OPS or node.inputs[0] is not last or len(node.outputs) != 1:
            return chain
        chain.append(node.outputs[0])


def mix_consumer(t: gs.Tensor) -> tuple[gs.Node, gs.Tensor]:
    """The one MatMul/Einsum that consumes ``t`` (through reshapes/transposes), and the tensor it reads."""
    found, seen, frontier = [], set(), [t]
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in MIX_OPS:
                found.append((node, tensor))
            elif node.op in TO_MIX_OPS and node.inputs[0] is tensor:
                frontier.extend(node.outputs)
    if len(found) != 1:
        raise Decline(f"softmax output {t.name} feeds {len(found)} MatMul/Einsum nodes, expected 1")
    return found[0]


def detach(t: gs.Variable) -> None:
    """Cuts ``t`` from its producer (which keeps a renamed copy), so a new node can produce ``t``."""
    node = producer(t)
    if node is not None:
        node.outputs[node.outputs.index(t)] = gs.Variable(f"{t.name}.replaced", dtype=t.dtype, shape=t.shape)


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = settings.REWRITE_CHECK_RTOL[Precision.FP32]) -> bool:
    """Float values equal to ``expected`` within ``rtol`` of its scale (the parity check's measure)."""
    return _close_to(actual, expected, rtol)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def onnx_dtype(t: gs.Variable) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))


def emit_plugin(graph: gs.Graph, node: PluginNode, inputs: list, outputs: list, name: str) -> None:
    attrs = {**node.attrs, **PARSER_ATTRIBUTES}
    domain = registry.spec(node.plugin).namespace
    graph.layer(op=node.plugin, name=name, domain=domain, inputs=inputs, outputs=outputs, attrs=attrs)


def batch_free(shape, prefix: int, images: int) -> np.ndarray:
    """``shape`` with the batch-carrying dimension as -1 (the one after ``prefix`` leading elements)."""
    shape = list(shape)
    for i in range(len(shape)):
        if math.prod(shape[:i]) == prefix and shape[i] % images == 0:
            shape[i] = -1
            return np.array(shape, np.int64)
    raise Decline(f"cannot reshape the plugin output to {tuple(shape)} without fixing the batch size")


def reshaped(graph: gs.Graph, t: gs.Variable, shape, canonical, target, name: str) -> gs.Variable:
    if tuple(shape) == tuple(canonical):
        return t
    return graph.layer(
        op="Reshape", inputs=[t, np.array(target, np.int64)], outputs=[gs.Variable(name, dtype=t.dtype)]
    )[0]
