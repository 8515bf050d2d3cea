"""Reduced-precision graphs: FP16 or BF16 tokens, weights and expert MatMuls, with the routing in FP32.

TensorRT 11 builds strongly typed networks only, so a reduced-precision engine needs the precision in
the ONNX graph itself. ``reduce_precision`` (running ``ReducePrecisionPass``, an ``onnx_ir`` pass)
rewrites an exported FP32 graph (an ``onnx_ir`` model, in place) so that every float tensor is FP16 or
BF16 except those of the nodes kept in FP32, with one Cast wherever a tensor crosses between the two:

* **Kept in FP32** (``routing="fp32"``, the default): the router of every MoE layer.
  V-MoE: the router MatMul (scope ``<layer>.router``), the softmax giving the gates (in the layer's own
  scope) and all routing math (scope ``<layer>.routing``: top-k, priorities, buffer positions,
  capacity). Soft-MoE, found by op pattern whoever wrote it (two Softmax nodes over one logits tensor,
  each feeding a MatMul/Einsum): everything between the token tensor and the two softmaxes, i.e. the
  l2-normalisations, the scale, the logits MatMul and both softmaxes. ``routing="reduced"`` keeps none
  of them: what a converter without a block list gives, for comparison.
* Also kept: any node whose op does not take the reduced type at the graph's opset
  (``onnx.defs`` type constraints, e.g. Conv has no BFLOAT16 before opset 22, Range none at all).
* **Reduced**: everything else, LayerNormalization and the residual stream included. The opset-17
  LayerNormalization keeps ``stash_type`` 1: the graph asks for its mean and variance in FP32 (ONNX
  Runtime computes them so; TensorRT parses the op into one INormalizationLayer rather than the
  overflow-prone FP16 Pow/ReduceMean chain behind the "layernorm nodes in FP16" reports). Keeping
  LayerNorm, or LayerNorm and the residual Adds, in FP32 as well changes the output error by little and
  adds two Casts per LayerNorm: ``benchmarks/precision.py`` measures both (README, "Reduced precision").
  The graph's input and outputs stay FP32 (one Cast each), so every caller feeds and reads what it fed
  and read before.

Constants and weights are converted where their consumers are reduced; a weight that both sides read
is kept once per type. Values are rounded to nearest (``numpy``/``ml_dtypes``), so infinities stay
infinite: the routing masks use ``-inf`` (onnxconverter-common's float16 conversion clamps it to
-10000, one reason this pass is written here; the others: it cannot write BFLOAT16, and it leaves the
value types of the Casts torch.onnx emits stale, which onnx.checker refuses).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from exporter import settings
from exporter.errors import UserError
from exporter.formats.graph import MIX_OPS, SCOPE_KEY, SHAPE_OPS, module_path
from exporter.settings import Precision, RoutingPrecision

PRECISIONS, ROUTING_PRECISIONS = settings.PRECISIONS, settings.ROUTING_PRECISIONS
DTYPES = {Precision.FP16: ir.DataType.FLOAT16, Precision.BF16: ir.DataType.BFLOAT16}
ONNX_TYPE_NAMES = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}

# Ops that read a float tensor without computing on it: they take either type, no Cast is needed
# in front of them, and a reduced one whose ``to`` is FLOAT casts to the reduced type instead.
TYPE_FREE_OPS = {"Cast", "Shape", "Size"}


@dataclass
class PrecisionResult:
    """What ``reduce_precision`` did.

    Attributes:
        precision: ``fp16`` or ``bf16``.
        routing: ``fp32`` (routing pinned) or ``reduced``.
        casts: Cast nodes inserted at the boundaries between FP32 and reduced tensors.
        fp32_nodes: Nodes that compute on floats in FP32, by reason (``routing``, ``Conv lacks bfloat16
            at opset 18``, ...).
        reduced_nodes: Nodes that compute on floats in the reduced type.
        weights: Initializers converted to the reduced type.
        shared_weights: Initializers both sides read: kept in FP32, with a reduced copy.
        overflows: Weights and constants with finite values beyond the reduced type's range (they
            became infinite): a graph that needs them cannot run in this precision as it is. Weights
            are converted when the model is saved, so theirs are listed from then on.
    """

    precision: str
    routing: str
    casts: int = 0
    fp32_nodes: dict[str, int] = field(default_factory=dict)
    reduced_nodes: int = 0
    weights: int = 0
    shared_weights: int = 0
    overflows: list[str] = field(default_factory=list)


def check_precision(precision: Precision, routing: RoutingPrecision = RoutingPrecision.FP32) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if routing not in ROUTING_PRECISIONS:
        raise UserError(f"routing precision must be one of {', '.join(ROUTING_PRECISIONS)}, got {routing!r}")
    if precision not in settings.REDUCED_PRECISIONS and routing != RoutingPrecision.FP32:
        raise UserError("`routing_precision=reduced` needs `precision` fp16 or bf16")


def check_quantized_targets(precision: str, arches, what: str) -> None:
    """FP8 needs sm_89 or newer (Ada, Hopper, Blackwell, Thor): a user error naming a target without it."""
    older = [a for a in arches if a < settings.FP8_MIN_TARGET]
    if precision == "fp8" and older:
        orin = " (Jetson Orin has no FP8: use `precision=int8`)" if 87 in older else ""
        raise UserError(
            f"{what} in fp8 cannot target sm_{older[0]}: FP8 needs sm_{settings.FP8_MIN_TARGET} or newer{orin}"
        )


# --- which nodes stay FP32 ------------------------------------------------------------------------


def _scope(node: ir.Node) -> list[str]:
    return module_path(node.metadata_props.get(SCOPE_KEY, ""))


def vmoe_routing_nodes(graph: ir.Graph, layers) -> set[ir.Node]:
    """The router MatMul, the gates' softmax and the routing math of each V-MoE layer, by scope."""
    layers = set(layers)
    kept = set()
    for node in graph:
        path = _scope(node)
        module = path[-1] if path else ""
        owner, _, part = module.rpartition(".")
        if (owner in layers and part in ("router", "routing")) or (node.op_type == "Softmax" and module in layers):
            kept.add(node)
    return kept


def _back_chain(value: ir.Value) -> ir.Value:
    while (node := value.producer()) is not None and node.op_type in SHAPE_OPS and node.inputs[0] is not None:
        value = node.inputs[0]
    return value


def _mix_inputs(value: ir.Value) -> list[ir.Value]:
    """The other inputs of the MatMul/Einsum nodes ``value`` feeds (through reshapes/transposes)."""
    found, frontier, seen = [], [value], set()
    while frontier:
        v = frontier.pop()
        for node, index in v.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in MIX_OPS:
                found += [x for i, x in enumerate(node.inputs) if i != index and x is not None]
            elif node.op_type in SHAPE_OPS and index == 0:
                frontier.extend(node.outputs)
    return found


def _ancestors(values) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    frontier = [v.producer() for v in values if v is not None and v.producer() is not None]
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        frontier += [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
    return seen


def soft_routing_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Of every Soft-MoE layer (two Softmax nodes over one logits tensor, each feeding a mix): the
    nodes between its token tensor and the two softmaxes, the softmaxes included."""
    by_root: dict[int, list[ir.Node]] = {}
    for node in graph:
        if node.op_type == "Softmax" and node.inputs[0] is not None:
            by_root.setdefault(id(_back_chain(node.inputs[0])), []).append(node)
    kept = set()
    for pair in by_root.values():
        mixes = [_mix_inputs(n.outputs[0]) for n in pair]
        if len(pair) != 2 or not all(mixes):
            continue
        # the tokens the layer mixes (not the expert outputs, which come after the softmaxes)
        tokens = [t for xs in mixes for x in xs if not (_ancestors([t := _back_chain(x)]) & set(pair))]
        upstream = _ancestors(tokens)
        kept |= (_ancestors(n.outputs[0] for n in pair) - upstream) | set(pair)
    return kept


@functools.cache
def _constraints(op_type: str, domain: str, opset: int) -> tuple[list[str], list[str], dict[str, set[str]]] | None:
    """(type symbol per formal input, per formal output, {symbol: allowed types}) of an op's schema."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return [p.type_str for p in schema.inputs], [p.type_str for p in schema.outputs], allowed


def _takes(node: ir.Node, opset: int, type_name: str) -> bool:
    """Whether the op admits ``type_name`` at each of the node's float inputs and outputs."""
    found = _constraints(node.op_type, node.domain, opset)
    if found is None:
        return False
    formal_in, formal_out, allowed = found
    for formal, values in ((formal_in, node.inputs), (formal_out, node.outputs)):
        for i, value in enumerate(values):
            if not _is_float(value) or not formal:
                continue
            symbol = formal[min(i, len(formal) - 1)]  # the last formal parameter may be variadic
            if type_name not in allowed.get(symbol, {type_name}):
                return False
    return True


# --- the pass -------------------------------------------------------------------------------------


def _convert(tensor, dtype: ir.DataType, overflows: list[str] | None = None) -> ir.Tensor:
    """The tensor rounded to ``dtype`` (nearest); a finite value that becomes infinite is recorded."""
    array = tensor.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(dtype.numpy())
    floating = overflows is not None and np.issubdtype(array.dtype, np.floating)
    if floating and np.any(np.isfinite(array) & ~np.isfinite(converted.astype(np.float32))):
        name = tensor.name or "a constant"
        if name not in overflows:
            overflows.append(name)
    return ir.tensor(converted, name=tensor.name)


def _convert_lazily(tensor, dtype: ir.DataType, overflows: list[str]) -> ir.LazyTensor:
    """A weight converted when it is written, not now: saving streams one weight at a time, so a
    model whose FP32 weights fill the memory converts without a second copy of them."""
    return ir.LazyTensor(lambda: _convert(tensor, dtype, overflows), dtype, tensor.shape, name=tensor.name)


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


@dataclass
class ReducePrecisionPassResult(ir.passes.PassResult):
    """The pass's result: the model, whether it changed, and what it did (``report``)."""

    report: PrecisionResult


class ReducePrecisionPass(ir.passes.InPlacePass):
    """Rewrites a model (in place) to FP16 or BF16 with the routing kept in FP32 (see the module).

    One method per phase, run in order by ``call``: which nodes stay FP32 (``_classify``), constants
    and weights (``_convert_constants``, ``_convert_initializers``), the tensors reduced nodes make
    (``_retype_outputs``), the Casts between the two types (``_cast_inputs``, ``_cast_outputs``).

    Attributes:
        precision: ``fp16`` or ``bf16``.
        routing: ``fp32`` keeps every MoE router and the routing math in FP32; ``reduced`` does not.
        vmoe_layers: The V-MoE layers' module names (their scopes name the routing nodes).
        keep: Further nodes to keep in FP32.
    """

    def __init__(
        self,
        precision: str,
        *,
        routing: RoutingPrecision = RoutingPrecision.FP32,
        vmoe_layers=(),
        keep: Callable[[ir.Node], bool] | None = None,
    ) -> None:
        super().__init__()
        check_precision(precision, routing)
        if precision not in settings.REDUCED_PRECISIONS:
            raise ValueError(
                f"reduce_precision converts to fp16 or bf16, not {precision} (see exporter.export.quantize)"
            )
        self.precision, self.routing, self.vmoe_layers, self.keep = precision, routing, vmoe_layers, keep
        self.low = DTYPES[precision]
        self._reset(None)

    def _reset(self, graph: ir.Graph | None) -> None:
        """Fresh state for a run over ``graph``."""
        self._graph = graph
        self._report = PrecisionResult(self.precision, self.routing)
        self._low_nodes: set[ir.Node] = set()
        self._casts: dict[tuple[int, ir.DataType], ir.Value] = {}

    def call(self, model: ir.Model) -> ReducePrecisionPassResult:
        inferred = self._prepare(model)
        self._reset(model.graph)
        self._classify(self._pinned())
        self._convert_constants()
        self._convert_initializers()
        self._retype_outputs()
        self._cast_inputs()
        self._cast_outputs()
        self._report.casts = len(self._casts)
        self._graph.sort()
        modified = inferred or bool(self._low_nodes or self._casts)
        return ReducePrecisionPassResult(model, modified, self._report)

    def _prepare(self, model: ir.Model) -> bool:
        """Refuses local functions; types every value (torch.onnx types every value; others may not).
        Whether it inferred types."""
        if model.functions:
            raise UserError("graphs with local functions cannot be converted to reduced precision (export it again)")
        if not any(v.type is None for node in model.graph for v in node.outputs):
            return False
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
        return True

    def _pinned(self) -> set[ir.Node]:
        """The routing nodes kept in FP32 (none with ``routing="reduced"``)."""
        if self.routing != RoutingPrecision.FP32:
            return set()
        return vmoe_routing_nodes(self._graph, self.vmoe_layers) | soft_routing_nodes(self._graph)

    def _classify(self, pinned: set[ir.Node]) -> None:
        """Which nodes compute in the reduced type, and the others' count by reason."""
        opset = self._graph.opset_imports.get("", 1)
        reasons: Counter = Counter()
        for node in self._graph:
            floats = [v for v in (*node.inputs, *node.outputs) if _is_float(v)]
            if node.op_type in ("Constant", "Shape", "Size") or not floats:
                continue  # (Shape and Size read dimensions: any float type will do)
            if node in pinned:
                reasons["routing"] += 1
            elif self.keep is not None and self.keep(node):
                reasons["kept by the caller"] += 1
            elif node.op_type in TYPE_FREE_OPS:
                self._low_nodes.add(node)
            elif not _takes(node, opset, ONNX_TYPE_NAMES[self.low]):
                reasons[f"{node.op_type} takes no {self.low.name.lower()} at opset {opset}"] += 1
            else:
                self._low_nodes.add(node)
        self._report.fp32_nodes, self._report.reduced_nodes = dict(reasons), len(self._low_nodes)

    def _wants_low(self, node: ir.Node) -> bool:
        return node in self._low_nodes

    def _convert_constants(self) -> None:
        """Constant nodes whose every consumer is reduced hold the reduced type."""
        for node in [n for n in self._graph if n.op_type == "Constant" and _is_float(n.outputs[0])]:
            value = node.outputs[0]
            users = {self._wants_low(n) for n, _ in value.uses()}
            if users == {True} and not value.is_graph_output():
                converted = _convert(node.attributes["value"].value, self.low, self._report.overflows)
                node.attributes["value"] = ir.AttrTensor("value", converted)
                value.dtype = self.low

    def _convert_initializers(self) -> None:
        """Weights: one copy per type their consumers want (converted when the model is saved)."""
        graph, low, report = self._graph, self.low, self._report
        for name, value in list(graph.initializers.items()):
            if not _is_float(value) or value.const_value is None:
                continue
            users = {self._wants_low(n) for n, _ in value.uses()}
            if True not in users:
                continue
            if users == {True} and not value.is_graph_input():
                value.const_value = _convert_lazily(value.const_value, low, report.overflows)
                value.dtype = low
                report.weights += 1
                continue
            copy = ir.Value(name=f"{name}.{self.precision}", type=ir.TensorType(low), shape=value.shape)
            copy.const_value = _convert_lazily(value.const_value, low, report.overflows)
            graph.register_initializer(copy)
            for n, i in list(value.uses()):
                if self._wants_low(n):
                    n.replace_input_with(i, copy)
            report.shared_weights += 1

    def _retype_outputs(self) -> None:
        """Every float tensor a reduced node makes is reduced; a Cast to FLOAT there casts to the
        reduced type, a ConstantOfShape fills with it."""
        for node in self._low_nodes:
            if node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", self.low)
            for out in node.outputs:
                if _is_float(out):
                    out.dtype = self.low
            if node.op_type == "ConstantOfShape" and "value" in node.attributes:
                attr = node.attributes["value"].value
                if attr.dtype == ir.DataType.FLOAT:
                    converted = _convert(attr, self.low, self._report.overflows)
                    node.attributes["value"] = ir.AttrTensor("value", converted)

    def _cast_inputs(self) -> None:
        """A Cast in front of every input whose type is not the one its consumer computes in."""
        for node in list(self._graph):
            if node.op_type in TYPE_FREE_OPS:  # (the snapshot holds no inserted Cast)
                continue
            want = self.low if self._wants_low(node) else ir.DataType.FLOAT
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype in (ir.DataType.FLOAT, self.low) and value.dtype != want:
                    node.replace_input_with(i, self._cast(value, want, node))

    def _cast_outputs(self) -> None:
        """The graph's outputs stay FP32: a reduced one is cast back, under its own name."""
        graph = self._graph
        for i, value in enumerate(list(graph.outputs)):
            if value.dtype == self.low:
                name = value.name
                value.name = f"{name}.{self.precision}"
                out = self._cast(value, ir.DataType.FLOAT, value.producer())
                out.name = name
                graph.outputs[i] = out

    def _cast(self, value: ir.Value, to: ir.DataType, scope_of: ir.Node) -> ir.Value:
        """``value`` cast to ``to``: one Cast per value and type, after its producer (or before
        ``scope_of``, whose scope it takes)."""
        key = (id(value), to)
        if key not in self._casts:
            suffix = Precision.FP32 if to == ir.DataType.FLOAT else self.precision
            out = ir.Value(name=f"{value.name}.{suffix}", type=ir.TensorType(to), shape=value.shape)
            node = ir.Node(
                "", "Cast", [value], [ir.AttrInt64("to", to)], outputs=[out], name=f"{value.name}.cast_{suffix}"
            )
            if SCOPE_KEY in scope_of.metadata_props:
                node.metadata_props[SCOPE_KEY] = scope_of.metadata_props[SCOPE_KEY]
            producer = value.producer()
            if producer is None:
                self._graph.insert_before(scope_of, node)
            else:
                self._graph.insert_after(producer, node)
            self._casts[key] = out
        return self._casts[key]


def reduce_precision(
    model: ir.Model,
    precision: str,
    *,
    routing: RoutingPrecision = RoutingPrecision.FP32,
    vmoe_layers=(),
    keep: Callable[[ir.Node], bool] | None = None,
) -> PrecisionResult:
    """Rewrites ``model`` (in place) to ``precision`` with the routing kept in FP32 (see the module):
    runs ``ReducePrecisionPass``; ``fp32`` leaves the model as it is.

    Args:
        model: An exported FP32 graph (onnx_ir).
        precision: ``fp16`` or ``bf16``.
        routing: ``fp32`` keeps every MoE router and the routing math in FP32; ``reduced`` does not.
        vmoe_layers: The V-MoE layers' module names (their scopes name the routing nodes).
        keep: Further nodes to keep in FP32 (``benchmarks/precision.py`` measures LayerNorm and the
            residual stream in FP32 with it).
    """
    check_precision(precision, routing)
    if precision == Precision.FP32:
        return PrecisionResult(precision, routing)
    return ReducePrecisionPass(precision, routing=routing, vmoe_layers=vmoe_layers, keep=keep)(model).report
