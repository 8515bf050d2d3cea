"""INT8 and FP8 graphs with explicit Q/DQ, and weight-only INT8/INT4 expert weights, with the routing
kept exact (in FP32).

TensorRT 11 and TensorRT for RTX take INT8 and FP8 only as explicit QuantizeLinear/DequantizeLinear
pairs in the graph, in one form: symmetric (zero point 0), weights per output channel, activations per
tensor, no bias quantization. ``quantize`` (running ``QuantizePass``, an ``onnx_ir`` pass) rewrites an
exported FP32 graph (an ``onnx_ir`` model, in place) into that form:

* **Quantized** (``int8``, ``fp8``): the inputs of every MatMul, Gemm and Conv outside the routing:
  patch embedding, attention projections, the attention's two activation matmuls, dense MLPs, the
  experts' two batched MatMuls and the head. Weights are stored quantized with one scale per output
  channel; an expert weight ``[E, K, N]`` has one per expert and output channel (stored as ``[K, E*N]``
  per channel, then a Reshape and Transpose back to ``[E, K, N]``: the per-channel form every TensorRT
  parses). The expert activations ``[E, rows, K]`` get one scale per expert (a per-axis Q/DQ on the
  expert axis); every other activation one scale. Biases, and everything the Q/DQ pairs do not
  surround, stay FP32.
* **Kept in FP32**: everything of a MoE layer but its experts (V-MoE: router, gates' softmax, routing
  math, dispatch, combine; Soft-MoE: the l2-normalised logits, both softmaxes, the dispatch and combine
  mixes), the nodes ``precision.soft_routing_nodes`` finds in any other author's Soft-MoE and the
  mixes reading them, any MatMul whose output reaches a TopK or ArgMax through softmax, scaling and
  reshapes (another author's top-k router, found without its name), LayerNorm, softmax, GELU and the
  residual Adds (no Q/DQ sits on them). So no DequantizeLinear feeds a router or a gate.
* **Calibration**: the activations' scales are the largest magnitudes each tensor takes (``max``
  calibration: the symmetric form TensorRT wants, no clipping) over the calibration images, run through
  the FP32 graph in ONNX Runtime. The dispatched expert buffers hold zeros in their empty slots, so the
  tokens each expert saw are the buffer rows that are not all zero: counted per expert and layer, and
  an expert that saw fewer than ``settings.CALIBRATION_MIN_EXPERT_TOKENS`` is warned about (its scale
  comes from what it saw; one that saw none takes its layer's).
* **Weight-only** (``w8``, ``w4``): only the experts' weights, dequantized to FP32 before their
  MatMuls (batch-1 edge inference, where reading expert weights dominates). ``w8``: INT8, one scale
  per expert and output channel. ``w4``: INT4, one scale per block of ``settings.W4_BLOCK`` along the
  contracted axis (``DequantizeLinear`` with ``block_size``, opset 21). No calibration.

FP8 (E4M3) and INT4 need opset 19 and 21: those graphs are written at opset 21
(``settings.QUANTIZED_OPSET``; no op the exporter writes changed meaning between 18 and 21).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from exporter import settings
from exporter.errors import UserError
from exporter.export.precision import soft_routing_nodes
from exporter.formats.graph import SCOPE_KEY, SHAPE_OPS, module_path

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
INT8_MAX = 127.0  # symmetric: [-127, 127], as TensorRT quantizes
INT4_MAX = 7.0


@dataclass
class QuantizeResult:
    """What ``quantize`` did.

    Attributes:
        precision: ``int8``, ``fp8``, ``w8`` or ``w4``.
        calibration: Where the activations' scales came from (one line), or "" for weight-only.
        calibration_images: Images the scales were taken over.
        calibration_seconds: The calibration run's wall time.
        quantized_nodes: MatMul/Gemm/Conv nodes with Q/DQ on their inputs, by op type.
        float_nodes: MatMul/Gemm/Conv nodes left in FP32, by reason.
        expert_tokens: Per MoE layer, the tokens each expert saw during calibration.
        warnings: Experts that saw too few tokens to calibrate, one line each.
        expert_weight_bytes: The experts' weights before and after (with their scales).
        weight_bytes: All weights before and after.
    """

    precision: str
    calibration: str = ""
    calibration_images: int = 0
    calibration_seconds: float = 0.0
    quantized_nodes: dict[str, int] = field(default_factory=dict)
    float_nodes: dict[str, int] = field(default_factory=dict)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    expert_weight_bytes: tuple[int, int] = (0, 0)
    weight_bytes: tuple[int, int] = (0, 0)


# --- calibration data -----------------------------------------------------------------------------


def calibration_images(
    path: str | Path,
    input_name: str,
    input_shape: tuple[int, ...],
    *,
    normalization=settings.REFERENCE_NORMALIZATION,
) -> np.ndarray:
    """The calibration images ``[N, *input_shape]`` float32: an .npz holding exactly the graph's input
    (its name, float32, finite), or a folder of PNG/JPEG images preprocessed by the model's input
    convention (``exporter.sources.digits.image_file``). Anything else is one line (a user error)."""
    from exporter.formats.arrays import check_finite, load_npz

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in settings.CALIBRATION_SUFFIXES)
        if not files:
            raise UserError(f"calibration folder {path} holds no PNG or JPEG images")
        limit = settings.MAX_INPUT_BYTES // (4 * int(np.prod(input_shape)))
        if len(files) > limit:
            raise UserError(
                f"calibration folder {path} holds {len(files):,} images; at most {limit:,} of "
                f"{'x'.join(map(str, input_shape))} fit settings.MAX_INPUT_BYTES"
            )
        from exporter.sources.digits import image_file

        return np.concatenate([image_file(f, input_shape, normalization).numpy() for f in files])
    if path.suffix != ".npz" or not path.is_file():
        what = "does not exist" if not path.exists() else "is neither an .npz nor a folder of images"
        raise UserError(f"calibration {path} {what}")
    arrays = load_npz(path, what="calibration images")
    if set(arrays) != {input_name}:
        raise UserError(f"{path} holds {sorted(arrays)}; a calibration .npz holds one array named {input_name!r}")
    array = arrays[input_name]
    if array.dtype != np.float32:
        raise UserError(f"{path}: {input_name!r} is {array.dtype}; the graph takes float32 (convert it with .astype)")
    if array.ndim != 1 + len(input_shape) or tuple(array.shape[1:]) != tuple(input_shape) or not len(array):
        want = "x".join(map(str, input_shape))
        raise UserError(f"{path}: {input_name!r} is {'x'.join(map(str, array.shape))}; the graph takes Nx{want}")
    check_finite(array, input_name, path)
    return array


def whole_groups(images: np.ndarray, batch_multiple: int, where: str) -> np.ndarray:
    """The images in whole routing groups (the last partial group left out); too few is a user error."""
    usable = len(images) // batch_multiple * batch_multiple
    if usable == 0:
        raise UserError(
            f"{where} holds {len(images)} images; calibration needs at least one routing group ({batch_multiple})"
        )
    return images[:usable]


# --- which nodes are quantized --------------------------------------------------------------------


def _path(node: ir.Node) -> list[str]:
    return module_path(node.metadata_props.get(SCOPE_KEY, ""))


def _within(path: list[str], module: str) -> bool:
    return any(p == module or p.startswith(module + ".") for p in path)


def _from_kept(value: ir.Value, kept: set[ir.Node]) -> bool:
    while (node := value.producer()) is not None:
        if node in kept:
            return True
        if node.op_type not in SHAPE_OPS or node.inputs[0] is None:
            return False
        value = node.inputs[0]
    return False


# Ops a router's logits pass through on their way to a top-k choice (softmax or sigmoid gates, scaling,
# noise-free reshapes); a MatMul whose output reaches TopK or ArgMax through them is a router.
_TO_CHOICE = SHAPE_OPS | {"Softmax", "Sigmoid", "Cast", "Add", "Sub", "Mul", "Div", "Exp", "ReduceMax", "ReduceSum"}
_CHOICE_OPS = {"TopK", "ArgMax"}


def feeds_choice(node: ir.Node, depth: int = 8) -> bool:
    """Whether ``node``'s output reaches a TopK or ArgMax within ``depth`` elementwise or shape ops: the
    router of any author's top-k layer, found without its module's name."""
    frontier, seen = list(node.outputs), set()
    for _ in range(depth):
        following = []
        for value in frontier:
            for user, _ in value.uses():
                if user.op_type in _CHOICE_OPS:
                    return True
                if user.op_type in _TO_CHOICE and id(user) not in seen:
                    seen.add(id(user))
                    following += list(user.outputs)
        frontier = following
    return False


def plan(graph: ir.Graph, moe_layers) -> tuple[dict[ir.Node, str], dict[str, int]]:
    """``({node: "dense" | "expert"}, {reason: count})``: the MatMul/Gemm/Conv nodes to quantize, and
    those kept in FP32 by reason."""
    moe_layers = list(moe_layers)
    soft = soft_routing_nodes(graph)
    chosen: dict[ir.Node, str] = {}
    kept: dict[str, int] = {}
    for node in graph:
        if node.op_type not in QUANTIZED_OPS:
            continue
        path = _path(node)
        layer = next((m for m in moe_layers if _within(path, m)), None)
        if layer is not None:
            if _within(path, f"{layer}.experts"):
                chosen[node] = "expert"
            else:
                kept["routing (router, dispatch, combine)"] = kept.get("routing (router, dispatch, combine)", 0) + 1
        elif node in soft or any(v is not None and _from_kept(v, soft) for v in node.inputs):
            kept["Soft-MoE routing (logits, dispatch, combine)"] = (
                kept.get("Soft-MoE routing (logits, dispatch, combine)", 0) + 1
            )
        elif feeds_choice(node):  # another author's top-k router
            kept["router (feeds a top-k choice)"] = kept.get("router (feeds a top-k choice)", 0) + 1
        else:
            chosen[node] = "dense"
    return chosen, kept


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def _weight_axis(node: ir.Node, index: int, rank: int) -> int:
    """The output-channel axis of a weight input."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans = node.attributes.get("transB")
        return 0 if trans is not None and trans.value else 1
    return rank - 1  # MatMul: [..., K, N]


def _activations(chosen: dict[ir.Node, str]) -> dict[str, bool]:
    """{activation value name: per expert?} of the chosen nodes' float inputs that are not weights."""
    found: dict[str, bool] = {}
    for node, kind in chosen.items():
        for i, value in enumerate(node.inputs):
            if value is None or _is_weight(value) or value.dtype != ir.DataType.FLOAT:
                continue
            if node.op_type in ("Gemm", "Conv") and i == 2:
                continue  # a bias
            found[value.name] = found.get(value.name, False) or kind == "expert"
    return found


# --- calibration run ------------------------------------------------------------------------------


@dataclass
class _Ranges:
    amax: dict[str, np.ndarray] = field(default_factory=dict)  # per tensor, or per expert
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # expert inputs: rows not all zero


def _calibrate(model: ir.Model, activations: dict[str, bool], images: np.ndarray, batch: int) -> _Ranges:
    from exporter.backends.onnxruntime import OnnxRuntimeRunner

    ranges = _Ranges()
    names = list(activations)
    input_name = model.graph.inputs[0].name
    with tempfile.TemporaryDirectory(prefix="moe-export-calibration-") as folder:
        path = Path(folder) / "fp32.onnx"
        proto = ir.to_proto(model)
        onnx.save(proto, str(path), save_as_external_data=True, location="fp32.onnx.data", size_threshold=1024)
        header = onnx.load(str(path), load_external_data=False)
        del proto
        with OnnxRuntimeRunner(path, header=header, outputs=names) as runner:
            for start in range(0, len(images), batch):
                outputs = runner.infer({input_name: np.ascontiguousarray(images[start : start + batch])})
                for name, per_expert in activations.items():
                    x = np.abs(outputs[name])
                    amax = x.reshape(x.shape[0], -1).max(axis=1) if per_expert else np.array(x.max())
                    ranges.amax[name] = np.maximum(ranges.amax.get(name, 0), amax)
                    if per_expert:
                        rows = (x.max(axis=-1) > 0).reshape(x.shape[0], -1).sum(axis=1)
                        ranges.tokens[name] = ranges.tokens.get(name, 0) + rows
    return ranges


# --- the pass -------------------------------------------------------------------------------------


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
    value.const_value = ir.tensor(array, name=name)
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}.{i}", i + 1
    return name


def _qtype(precision: str):
    import ml_dtypes

    return {"int8": np.int8, "w8": np.int8, "fp8": ml_dtypes.float8_e4m3fn, "w4": ml_dtypes.int4}[precision]


def _qmax(precision: str) -> float:
    return {"int8": INT8_MAX, "w8": INT8_MAX, "fp8": FP8_MAX, "w4": INT4_MAX}[precision]


def quantize_array(array: np.ndarray, scale: np.ndarray, precision: str) -> np.ndarray:
    """``array / scale`` rounded to the quantized type (nearest even; saturated), as QuantizeLinear."""
    qmax = _qmax(precision)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.clip(array / scale, -qmax, qmax)
    x = np.nan_to_num(x)
    if precision == "fp8":
        return x.astype(_qtype(precision))
    return np.rint(x).astype(np.int8).astype(_qtype(precision))


def _scale(amax: np.ndarray, precision: str) -> np.ndarray:
    amax = np.asarray(amax, dtype=np.float64)
    return np.where(amax > 0, amax / _qmax(precision), 1.0).astype(np.float32)


def _dq_node(inputs, name: str, dtype=ir.DataType.FLOAT, shape=None, **attrs) -> ir.Node:
    attributes = [ir.AttrInt64(k, v) for k, v in attrs.items()]
    out = ir.Value(name=name, type=ir.TensorType(dtype), shape=shape)
    return ir.Node("", "DequantizeLinear", inputs, attributes, outputs=[out], name=f"{name}.node")


def _weight_dq(graph: ir.Graph, node: ir.Node, index: int, kind: str, precision: str) -> tuple[list[ir.Node], int]:
    """Nodes dequantizing weight input ``index`` of ``node`` (stored quantized), and its stored bytes."""
    value = node.inputs[index]
    w = value.const_value.numpy().astype(np.float32)
    base = _unique(graph, f"{value.name}.{precision}")
    if kind == "expert" and w.ndim == 3 and precision == "w4":
        experts, k, n = w.shape
        block = min(settings.W4_BLOCK, k)
        blocks = -(-k // block)
        padded = np.zeros((experts, blocks * block, n), np.float32)
        padded[:, :k] = w
        amax = np.abs(padded.reshape(experts, blocks, block, n)).max(axis=2)  # [E, blocks, N]
        scale = _scale(amax, precision)
        q = quantize_array(w, np.repeat(scale, block, axis=1)[:, :k], precision)
        qv, sv = _initializer(graph, base, q), _initializer(graph, f"{base}.scale", scale)
        zv = _initializer(graph, f"{base}.zero_point", np.zeros(scale.shape, _qtype(precision)))
        dq = _dq_node([qv, sv, zv], f"{base}.dequantized", shape=value.shape, axis=1, block_size=block)
        return [dq], q.size // 2 + scale.nbytes
    if node.op_type == "MatMul" and w.ndim == 3:  # [E, K, N] as [K, E*N]: one scale per expert and channel
        experts, k, n = w.shape
        scale = _scale(np.abs(w).max(axis=1), precision)  # [E, N]
        q = quantize_array(w, scale[:, None, :], precision).transpose(1, 0, 2).reshape(k, experts * n)
        qv, sv = _initializer(graph, base, q), _initializer(graph, f"{base}.scale", scale.reshape(-1))
        zv = _initializer(graph, f"{base}.zero_point", np.zeros(experts * n, _qtype(precision)))
        shape = _initializer(graph, f"{base}.shape", np.array([k, experts, n], np.int64))
        dq = _dq_node([qv, sv, zv], f"{base}.dequantized", shape=ir.Shape([k, experts * n]), axis=1)
        flat_type, flat_shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([k, experts, n])
        flat = ir.Value(name=f"{base}.unflattened", type=flat_type, shape=flat_shape)
        reshape = ir.Node("", "Reshape", [dq.outputs[0], shape], outputs=[flat], name=f"{base}.reshape")
        out = ir.Value(name=f"{base}.weight", type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape)
        perm = ir.AttrInt64s("perm", [1, 0, 2])
        transpose = ir.Node("", "Transpose", [flat], [perm], outputs=[out], name=f"{base}.transpose")
        return [dq, reshape, transpose], q.nbytes + scale.nbytes
    axis = _weight_axis(node, index, w.ndim)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    scale = _scale(np.abs(w).max(axis=reduce), precision)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = quantize_array(w, scale.reshape(shape), precision)
    qv, sv = _initializer(graph, base, q), _initializer(graph, f"{base}.scale", scale)
    zv = _initializer(graph, f"{base}.zero_point", np.zeros(scale.shape, _qtype(precision)))
    return [_dq_node([qv, sv, zv], f"{base}.dequantized", shape=value.shape, axis=axis)], q.nbytes + scale.nbytes


def _activation_qdq(graph: ir.Graph, value: ir.Value, amax: np.ndarray, precision: str) -> list[ir.Node]:
    scale = _scale(amax, precision)
    base = _unique(graph, f"{value.name}.{precision}")
    sv = _initializer(graph, f"{base}.scale", scale)
    zv = _initializer(graph, f"{base}.zero_point", np.zeros(scale.shape, _qtype(precision)))
    axis = {"axis": 0} if scale.ndim else {}
    qtype = ir.DataType.from_numpy(np.dtype(_qtype(precision)))
    q_out = ir.Value(name=f"{base}.quantized", type=ir.TensorType(qtype), shape=value.shape)
    attrs = [ir.AttrInt64(k, v) for k, v in axis.items()]
    q = ir.Node("", "QuantizeLinear", [value, sv, zv], attrs, outputs=[q_out], name=f"{base}.quantize")
    dq = _dq_node([q_out, sv, zv], f"{base}.dequantized", shape=value.shape, **axis)
    return [q, dq]


@dataclass
class QuantizePassResult(ir.passes.PassResult):
    """The pass's result: the model, whether it changed, and what it did (``report``)."""

    report: QuantizeResult


class QuantizePass(ir.passes.InPlacePass):
    """Rewrites a model (in place) to INT8/FP8 Q/DQ or weight-only INT8/INT4 experts (see the module).

    One method per phase, run in order by ``call``: which nodes are quantized (``_plan``), the
    activations' ranges (``_calibrate_activations``), the Q/DQ in front of those nodes (``_insert_qdq``),
    the FP32 weights nothing reads any more (``_drop_replaced``), the opset (``_raise_opset``) and the
    weights' sizes (``_measure``).

    Attributes:
        precision: ``int8`` or ``fp8`` (Q/DQ, calibrated), ``w8`` or ``w4`` (expert weights only).
        moe_layers: Module names of the MoE layers (V-MoE and Soft-MoE): their nodes outside
            ``<layer>.experts`` stay FP32.
        images: Calibration images ``[N, C, H, W]`` (``int8``/``fp8``), in whole routing groups.
        calibration: Where the images came from, one line for the report.
        batch: Images per calibration run (whole routing groups).
    """

    def __init__(
        self,
        precision: str,
        *,
        moe_layers=(),
        images: np.ndarray | None = None,
        calibration: str = "",
        batch: int = 8,
    ) -> None:
        super().__init__()
        self.precision, self.moe_layers = precision, tuple(moe_layers)
        self.images, self.calibration, self.batch = images, calibration, batch
        self.weight_only = precision in settings.WEIGHT_ONLY_PRECISIONS
        self._reset(None)

    def _reset(self, graph: ir.Graph | None) -> None:
        """Fresh state for a run over ``graph``."""
        self._graph = graph
        self._report = QuantizeResult(self.precision, calibration=self.calibration)
        self._ranges = _Ranges()
        self._before: dict[str, int] = {}  # initializer bytes before
        self._expert_names: set[str] = set()  # the experts' weights
        self._expert_after = 0  # their bytes after
        self._weights: dict[str, ir.Value] = {}  # weight name: its dequantized value
        self._activations: dict[str, ir.Value] = {}  # activation name: its quantized-dequantized value
        self._counts: dict[str, int] = {}  # quantized nodes by op type

    def call(self, model: ir.Model) -> QuantizePassResult:
        if model.functions:
            raise UserError("graphs with local functions cannot be quantized (export it again)")
        self._reset(model.graph)
        chosen = self._plan()
        self._calibrate_activations(model, chosen)
        self._insert_qdq(chosen)
        self._drop_replaced()
        raised = self._raise_opset(model)
        self._measure()
        return QuantizePassResult(model, bool(self._counts) or raised, self._report)

    def _plan(self) -> dict[ir.Node, str]:
        """The nodes to quantize (``{node: "dense" | "expert"}``; the experts alone for weight-only),
        the others counted by reason; the weights' sizes before and which are the experts'."""
        graph = self._graph
        chosen, self._report.float_nodes = plan(graph, self.moe_layers)
        self._before = {n: v.const_value.nbytes for n, v in graph.initializers.items() if v.const_value is not None}
        experts = [node for node, kind in chosen.items() if kind == "expert"]
        self._expert_names = {v.name for node in experts for v in node.inputs if _is_weight(v)}
        if self.weight_only:
            chosen = {n: k for n, k in chosen.items() if k == "expert"}
        return chosen

    def _calibrate_activations(self, model: ir.Model, chosen: dict[ir.Node, str]) -> None:
        """The largest magnitude of each activation the chosen nodes read, over the calibration images
        (none for weight-only), and the tokens each expert saw."""
        if self.weight_only:
            return
        images, batch = self.images, self.batch
        if images is None or not len(images):
            raise UserError(f"`precision={self.precision}` needs calibration images")
        fixed = self._graph.inputs[0].shape[0] if self._graph.inputs[0].shape is not None else None
        if isinstance(fixed, int):  # a model that fixes its batch: runs of exactly that many images
            images, batch = whole_groups(images, fixed, self.calibration or "the calibration images"), fixed
        start = time.perf_counter()
        self._ranges = _calibrate(model, _activations(chosen), images, batch)
        self._report.calibration_images, self._report.calibration_seconds = len(images), time.perf_counter() - start
        _expert_tokens(self._graph, chosen, self._ranges, self.moe_layers, self._report)

    def _insert_qdq(self, chosen: dict[ir.Node, str]) -> None:
        """Every float input of a chosen node but a bias read through DequantizeLinear: a weight
        stored quantized, an activation (not for weight-only) through a QuantizeLinear first."""
        for node in list(self._graph):
            kind = chosen.get(node)
            if kind is None:
                continue
            self._counts[node.op_type] = self._counts.get(node.op_type, 0) + 1
            for i, value in enumerate(list(node.inputs)):
                if value is None or value.dtype != ir.DataType.FLOAT or (node.op_type in ("Gemm", "Conv") and i == 2):
                    continue
                if _is_weight(value):
                    node.replace_input_with(i, self._dequantized_weight(node, i, kind))
                elif not self.weight_only:
                    node.replace_input_with(i, self._dequantized_activation(node, value))

    def _dequantized_weight(self, node: ir.Node, index: int, kind: str) -> ir.Value:
        """Weight input ``index`` of ``node`` stored quantized and dequantized (once per weight)."""
        name = node.inputs[index].name
        if name not in self._weights:
            nodes, stored = _weight_dq(self._graph, node, index, kind, self.precision)
            self._graph.insert_before(node, nodes)
            self._weights[name] = nodes[-1].outputs[0]
            if name in self._expert_names:
                self._expert_after += stored
        return self._weights[name]

    def _dequantized_activation(self, node: ir.Node, value: ir.Value) -> ir.Value:
        """``value`` quantized and dequantized at its calibrated scale (once per activation)."""
        if value.name not in self._activations:
            nodes = _activation_qdq(self._graph, value, self._ranges.amax[value.name], self.precision)
            self._graph.insert_before(node, nodes)
            self._activations[value.name] = nodes[-1].outputs[0]
        return self._activations[value.name]

    def _drop_replaced(self) -> None:
        """Removes the FP32 originals of the quantized weights that nothing reads any more."""
        for name in self._weights:
            value = self._graph.initializers[name]
            if not value.uses() and not value.is_graph_output():
                self._graph.initializers.pop(name)

    def _raise_opset(self, model: ir.Model) -> bool:
        """FP8 and INT4 need ``settings.QUANTIZED_OPSET``: whether the opset was raised to it."""
        if self.precision not in ("fp8", "w4"):
            return False
        graph = self._graph
        old = graph.opset_imports.get("", 1)
        graph.opset_imports[""] = max(old, settings.QUANTIZED_OPSET)
        model.opset_imports[""] = graph.opset_imports[""]
        return graph.opset_imports[""] != old

    def _measure(self) -> None:
        """The quantized nodes by op type; the experts' and all weights' bytes before and after."""
        after = {n: v.const_value.nbytes for n, v in self._graph.initializers.items() if v.const_value is not None}
        report, before = self._report, self._before
        report.quantized_nodes = self._counts
        report.expert_weight_bytes = (sum(before[n] for n in self._expert_names), self._expert_after)
        report.weight_bytes = (sum(before.values()), sum(after.values()))


def quantize(model: ir.Model, precision: str, **options) -> QuantizeResult:
    """Rewrites ``model`` (an exported FP32 graph, in place) to ``precision`` (see the module): runs
    ``QuantizePass``, whose arguments ``options`` are (``moe_layers``, ``images``, ``calibration``,
    ``batch``)."""
    return QuantizePass(precision, **options)(model).report


def _expert_tokens(graph: ir.Graph, chosen, ranges: _Ranges, moe_layers, result: QuantizeResult) -> None:
    """Per MoE layer, the tokens each expert saw (from its first expert MatMul's input); an expert with
    too few is warned about, and one with none takes its layer's largest scale."""
    seen = set()
    for node, kind in chosen.items():
        if kind != "expert":
            continue
        layer = next(m for m in moe_layers if _within(_path(node), m))
        for value in node.inputs:
            if value is None or value.name not in ranges.tokens:
                continue
            amax = ranges.amax[value.name]
            if np.any(amax == 0) and np.any(amax > 0):
                ranges.amax[value.name] = np.where(amax > 0, amax, amax.max())
            if layer in seen:
                continue
            seen.add(layer)
            tokens = [int(t) for t in ranges.tokens[value.name]]
            result.expert_tokens[layer] = tokens
            few = [e for e, t in enumerate(tokens) if t < settings.CALIBRATION_MIN_EXPERT_TOKENS]
            if few:
                result.warnings.append(
                    f"{layer}: expert{'s' if len(few) > 1 else ''} {', '.join(map(str, few))} saw "
                    f"{', '.join(str(tokens[e]) for e in few)} calibration tokens (fewer than "
                    f"{settings.CALIBRATION_MIN_EXPERT_TOKENS}): calibrate on more or more varied images"
                )
