"""What moe-export records in an exported graph, and how to read it back: metadata keys, the routing
outputs' names, node scopes, the batch rule of the image input. Needs onnx only (no torch), so the
rewrite, the engine check and the bundle reader stay torch-free.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from exporter import settings
from exporter.errors import UserError
from exporter.settings import Precision, RoutingPrecision
from plugins.spec import NAMESPACE

INPUT_NAME = "images"

# Model metadata (``metadata_props``), all JSON unless noted.
SOURCE_KEY = "moe_export.source"  # the ModelSource the graph was exported from
PREPROCESSING_KEY = "moe_export.preprocessing"  # text: what the images input expects (settings.PREPROCESSING)
ROUTING_LAYERS_KEY = "moe_export.routing_layers"  # V-MoE layers whose routing the graph outputs
VMOE_LAYERS_KEY = "moe_export.vmoe_layers"  # {layer: routing settings}, for the plugin rewrite
TUTEL_LAYERS_KEY = "moe_export.tutel_layers"  # {layer: routing settings} of Swin-MoE (tutel) layers
REWRITE_KEY = "moe_export.rewrite"  # {plugin: count}, set by the rewrite
PRECISION_KEY = "moe_export.precision"  # {"precision": settings.PRECISIONS, "routing": fp32|reduced}
BATCH_KEY = "moe_export.batch"  # the N of --input-shape N,C,H,W: the images validate runs unless --batch

# Routing outputs: three per V-MoE layer, ``routing.<layer>.<field>``.
ROUTING_PREFIX = "routing."
ROUTING_FIELDS = ("expert_index", "kept", "buffer_slot")

SCOPE_KEY = "namespace"  # node metadata torch.onnx writes: the module path of each node

# Ops that only reshape or reorder a tensor, and the ops that mix tokens: the patterns the rewrite
# and the reduced-precision pass walk to find a Soft-MoE layer.
SHAPE_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
MIX_OPS = frozenset({"MatMul", "Einsum"})


def plugin_stem(layer: str) -> str:
    """The prefix of the names the rewrite gives one MoE layer's plugin nodes and tensors
    (its route node is ``<stem>.route``)."""
    return f"{layer}.moe"


def routing_output_names(layer: str) -> list[str]:
    """``[expert_index, kept, buffer_slot]`` output names of one V-MoE layer."""
    return [f"{ROUTING_PREFIX}{layer}.{f}" for f in ROUTING_FIELDS]


def read_header(path: str | Path) -> onnx.ModelProto:
    """The graph without its weights; one clear error for a missing, unreadable or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).strip()[:120]})") from None
    if not model.graph.node:
        raise UserError(f"{path} is not a readable ONNX model (it has no graph)")
    return model


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def metadata_json(model: onnx.ModelProto, key: str, default=None):
    """One JSON metadata entry, decoded (``default`` when absent); a user error when it is not JSON.
    The typed readers below (``routing_layers``, ``vmoe_layers``, ``precision``) also check each
    value's type and range: metadata is data someone may have edited."""
    text = metadata(model).get(key)
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, and numbers Python refuses to parse
        raise bad_metadata(key, f"not JSON ({e})") from None


def bad_metadata(key: str, what: str) -> UserError:
    return UserError(f"the graph's metadata {key} is {what}; it was edited or written by another tool")


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and 0 < len(v) <= settings.MAX_NAME_CHARS for v in value)


def _int(value, low: int = 0, high: int = 2**31 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# The routing settings export records per V-MoE layer (export.vmoe_layer_settings): key -> check
_VMOE_LAYER_FIELDS = {
    "num_experts": lambda v: _int(v, 1),
    "k": lambda v: _int(v, 1),
    "batch_priority": lambda v: isinstance(v, bool),
    "capacity_factor": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
    "capacity": lambda v: v is None or _int(v, 1),
    "ceil_or_round": lambda v: v in ("ceil", "round"),
    "multiple_of": lambda v: v is None or _int(v, 1),
    "group_images": lambda v: _int(v, 1),
}


def routing_layers(model: onnx.ModelProto) -> list[str]:
    """The V-MoE layers whose routing the graph exposes as outputs."""
    layers = metadata_json(model, ROUTING_LAYERS_KEY, [])
    if not _names(layers):
        raise bad_metadata(ROUTING_LAYERS_KEY, "not a list of layer names")
    return layers


def vmoe_layers(model: onnx.ModelProto) -> dict[str, dict]:
    """``{layer: routing settings}`` of every V-MoE layer, as export recorded them."""
    layers = metadata_json(model, VMOE_LAYERS_KEY, {})
    if not isinstance(layers, dict) or not _names(list(layers)):
        raise bad_metadata(VMOE_LAYERS_KEY, "not a map of layer names to routing settings")
    for layer, fields in layers.items():
        if not isinstance(fields, dict):
            raise bad_metadata(VMOE_LAYERS_KEY, f"not a map of routing settings for {layer}")
        bad = [f for f, ok in _VMOE_LAYER_FIELDS.items() if f not in fields or not ok(fields[f])]
        if bad or fields["k"] > fields["num_experts"] or not math.isfinite(fields["capacity_factor"] or 1):
            raise bad_metadata(VMOE_LAYERS_KEY, f"out of range or missing for {layer}: {', '.join(bad) or 'k'}")
    return layers


# The float types a graph of each precision stores its weights in (its input and outputs stay FP32).
_WEIGHT_TYPES = {
    Precision.FP32: set(),
    Precision.FP16: {onnx.TensorProto.FLOAT16},
    Precision.BF16: {onnx.TensorProto.BFLOAT16},
    Precision.INT8: {onnx.TensorProto.INT8},  # Q/DQ weights, scales FP32 (exporter/export/quantize.py)
    Precision.FP8: {onnx.TensorProto.FLOAT8E4M3FN},
    Precision.W8: {onnx.TensorProto.INT8},
    Precision.W4: {onnx.TensorProto.INT4},
}
_TYPED = {t for types in _WEIGHT_TYPES.values() for t in types}


def recorded_batch(model: onnx.ModelProto) -> int | None:
    """The batch export was given (``--input-shape N,C,H,W``), or None when none was."""
    text = metadata(model).get(BATCH_KEY)
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"the graph records a batch of {text[:40]!r}; a whole number of images >= 1 was expected")
    return int(text)


def precision(model: onnx.ModelProto) -> tuple[Precision, RoutingPrecision]:
    """``(precision, routing precision)`` the graph was exported in; ``("fp32", "fp32")`` when unrecorded.
    A recorded precision must be the one of the graph's weights (an FP32 graph holds no FP16/BF16
    weight, an FP16 or BF16 graph its weights in that type): a user error otherwise."""
    recorded = metadata_json(model, PRECISION_KEY, None)
    if recorded is None:
        return Precision.FP32, RoutingPrecision.FP32
    if (
        not isinstance(recorded, dict)
        or recorded.get("precision") not in settings.PRECISIONS
        or recorded.get("routing", RoutingPrecision.FP32) not in settings.ROUTING_PRECISIONS
    ):
        raise bad_metadata(PRECISION_KEY, f"not a precision ({', '.join(settings.PRECISIONS)}) and routing precision")
    found = weight_types(model) & _TYPED
    want = _WEIGHT_TYPES[recorded["precision"]]
    if found != want:
        held = ", ".join(sorted(onnx.helper.tensor_dtype_to_np_dtype(t).name for t in found)) or "float32 only"
        raise UserError(
            f"the graph's metadata says it is {recorded['precision']} but its weights are {held}; it was edited "
            "or written by another tool"
        )
    return Precision(recorded["precision"]), RoutingPrecision(recorded.get("routing", RoutingPrecision.FP32))


def weight_types(model: onnx.ModelProto) -> set[int]:
    """The element types of the graph's initializers and Constant nodes (read without the weights)."""
    types = {t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and not node.domain:
            types |= {a.t.data_type for a in node.attribute if a.name == "value"}
    return types


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs that are not initializers."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The one image input; a user error for graphs with more."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"the graph has {len(inputs)} inputs; only single-input image models are supported")
    return inputs[0]


def input_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Each dimension: its size, its symbol (``"8*groups"``), or None when unnamed."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def batch_multiple(model: onnx.ModelProto) -> int:
    """Images per batch must be a multiple of this: the routing group of ``8*groups``, else 1."""
    dims = input_dims(image_input(model))
    batch = dims[0] if dims else None
    match = re.match(r"\s*(\d+)\s*\*", batch) if isinstance(batch, str) else None
    return int(match.group(1)) if match else 1


def node_scopes(model: onnx.ModelProto) -> dict[str, str]:
    """``{node name: scope}``: the module path torch.onnx records on each node."""
    return {
        n.name: next((p.value for p in n.metadata_props if p.key == SCOPE_KEY), "") for n in model.graph.node if n.name
    }


def module_path(scope: str) -> list[str]:
    """``": a.B/blocks.1: c.D/blocks.1.mlp: e.F/op: aten.x"`` -> ``["blocks.1", "blocks.1.mlp"]``."""
    parts = [p.split(":")[0].strip() for p in scope.split("/")[:-1]]
    return [p for p in parts if p]


def op_histogram(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op type the main graph has (``domain::Op`` outside the standard domain)."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def router_tensors(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """The router's outputs of every MoE layer, by layer: ``{"gates": name}`` for a V-MoE layer (the
    probabilities its routing reads: ArgMax inputs made outside the ``<layer>.routing`` scope) and
    ``{"dispatch": name, "combine": name}`` for a Soft-MoE layer whose router is a module (two
    Softmax nodes in one ``...router`` scope: over the tokens, axis 1, and over the slots, the last)."""
    scopes = {name: module_path(scope) for name, scope in node_scopes(model).items()}
    made_by = {o: n for n in model.graph.node for o in n.output}
    found: dict[str, dict[str, str]] = {}
    for layer in vmoe_layers(model):
        routing = f"{layer}.routing"
        inside = {n.name for n in model.graph.node if routing in scopes.get(n.name, [])}
        gates = {
            n.input[0]
            for n in model.graph.node
            if n.name in inside
            and n.op_type == "ArgMax"
            and made_by.get(n.input[0]) is not None
            and made_by[n.input[0]].name not in inside
        }
        if len(gates) == 1:
            found[layer] = {"gates": gates.pop()}
    softmaxes: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        path = scopes.get(node.name, [])
        if node.op_type == "Softmax" and path and path[-1].endswith(".router"):
            softmaxes.setdefault(path[-1].rsplit(".", 1)[0], []).append(node)
    for layer, nodes in softmaxes.items():
        axes = {next((a.i for a in n.attribute if a.name == "axis"), -1): n.output[0] for n in nodes}
        if len(nodes) == 2 and 1 in axes and (-1 in axes or 2 in axes):
            found[layer] = {"dispatch": axes[1], "combine": axes.get(-1, axes.get(2))}
    route = plugin_stem("") + ".route"
    for node in model.graph.node:  # after the rewrite: the route plugins, named <stem>.route
        layer = node.name.removesuffix(route)
        if node.domain != NAMESPACE or layer == node.name:
            continue
        if node.op_type == "TopKRoute":
            found[layer] = {"gates": node.input[0]}
        elif node.op_type == "SoftRoute":
            found[layer] = {"dispatch": node.output[0], "combine": node.output[1]}
    return found


def bfloat16_roundings(model: onnx.ModelProto) -> list[str]:
    """The roundings of an FP32 graph exported with ``--bf16-dispatch``, in node order: the output of
    each Cast back to float of a Cast to bfloat16 (the expert inputs and outputs of every MoE layer,
    ``exporter.models.experts.round_to_bfloat16``). Empty for FP16/BF16 graphs, whose Casts to the
    reduced type are the precision's own boundaries."""
    if precision(model)[0] != Precision.FP32:
        return []
    casts = [n for n in model.graph.node if n.op_type == "Cast" and not n.domain]
    to = {n.output[0]: next((a.i for a in n.attribute if a.name == "to"), None) for n in casts}
    return [
        n.output[0]
        for n in casts
        if to.get(n.input[0]) == onnx.TensorProto.BFLOAT16 and to[n.output[0]] == onnx.TensorProto.FLOAT
    ]


def plugin_routes(model: onnx.ModelProto) -> dict[str, dict]:
    """Every ``TopKRoute`` node of a rewritten graph, by layer: its outputs (``expert``, ``slot``), its
    input (``gates``), its attributes (``attrs``: the layer's routing semantics), ``group_tokens``, the
    tokens per routing group its input is reshaped to (None: the whole batch, or unknown), and
    ``experts`` (its TopKDispatch's). What validate needs to compare the routing of a layer moe-export
    did not write."""
    route = plugin_stem("") + ".route"
    made_by = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name: t for t in model.graph.initializer}
    experts = {
        n.name.removesuffix(plugin_stem("") + ".dispatch"): next(
            (a.i for a in n.attribute if a.name == "num_experts"), None
        )
        for n in model.graph.node
        if n.domain == NAMESPACE and n.op_type == "TopKDispatch"
    }
    found = {}
    for node in model.graph.node:
        layer = node.name.removesuffix(route)
        if node.domain != NAMESPACE or node.op_type != "TopKRoute" or layer == node.name:
            continue
        attrs = {
            a.name: onnx.helper.get_attribute_value(a)
            for a in node.attribute
            if a.name not in ("plugin_namespace", "aot")
        }
        group_tokens = None
        reshape = made_by.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape":
            shape = constants.get(reshape.input[1])
            if shape is None and (made := made_by.get(reshape.input[1])) is not None and made.op_type == "Constant":
                shape = next((a.t for a in made.attribute if a.name == "value"), None)
            if shape is not None:
                dims = onnx.numpy_helper.to_array(shape).tolist()
                group_tokens = int(dims[1]) if len(dims) == 3 and dims[0] == -1 and dims[1] > 0 else None
        found[layer] = dict(
            expert=node.output[0],
            slot=node.output[1],
            gates=node.input[0],
            attrs=attrs,
            group_tokens=group_tokens,
            experts=experts.get(layer),
        )
    return found
