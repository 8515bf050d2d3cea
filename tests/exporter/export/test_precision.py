"""Reduced-precision graphs: which tensors are FP16/BF16, which stay FP32 (the routing), the Casts
between them, infinities and overflows, ops without the reduced type, and every zoo model's graph
through onnx.checker (slow)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from exporter.errors import UserError
from exporter.export.precision import check_precision, reduce_precision
from exporter.formats.graph import PRECISION_KEY, metadata, module_path, node_scopes, precision, router_tensors

TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
FLOAT = onnx.TensorProto.FLOAT
VMOE = dict(capacity_factor=0.5, batch_priority=True)  # drops tokens, priorities decide


def typed(path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph and the element type of every tensor in it."""
    return typed_proto(onnx.load(str(path)))


def typed_proto(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    return model, types | {t.name: t.data_type for t in model.graph.initializer}


def float_types(node: onnx.NodeProto, types: dict[str, int]) -> set[int]:
    floats = {FLOAT, *TYPES.values()}
    return {types[t] for t in [*node.input, *node.output] if t in types and types[t] in floats}


def _module(scope: str) -> str:
    path = module_path(scope)
    return path[-1] if path else ""


@pytest.mark.parametrize("reduced", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_tokens_and_experts_are_reduced_and_the_routing_stays_fp32(exported, name, reduced):
    _, fp32 = exported(name, **(VMOE if name == "vmoe-tiny" else {}))
    _, result = exported(name, precision=reduced, **(VMOE if name == "vmoe-tiny" else {}))
    model, types = typed(result.path)
    onnx.checker.check_model(model, full_check=True)
    assert json.loads(metadata(model)[PRECISION_KEY]) == {"precision": reduced, "routing": "fp32"}
    assert precision(model) == (reduced, "fp32")
    # the caller feeds and reads FP32
    assert types["images"] == FLOAT and types["logits"] == FLOAT
    scopes = {n: _module(s) for n, s in node_scopes(model).items()}
    inserted = [n for n in model.graph.node if n.op_type == "Cast" and ".cast_" in n.name]  # the boundaries
    computing = [n for n in model.graph.node if n not in inserted]
    layers = set(router_tensors(model))
    # (Shape reads a tensor's dimensions, not its values: the type of what it reads does not matter)
    computing = [n for n in computing if n.op_type != "Shape"]
    routing = [n for n in computing if scopes[n.name].endswith((".router", ".routing"))]
    routing += [n for n in computing if n.op_type == "Softmax" and scopes[n.name] in layers]  # V-MoE gates
    assert routing and all(float_types(n, types) <= {FLOAT} for n in routing), "routing computes in FP32"
    experts = [n for n in model.graph.node if n.op_type == "MatMul" and scopes[n.name].endswith(".experts")]
    assert experts and all(float_types(n, types) == {TYPES[reduced]} for n in experts)
    for gates in (t for names in router_tensors(model).values() for t in names.values()):
        assert types[gates] == FLOAT  # what the route plugins read
    # one Cast per crossing: the image in and the logits out, then per layer the tokens into the
    # router and the routing's weights out (V-MoE: the combine weights; Soft-MoE: both weight tensors)
    assert result.casts == 2 + len(layers) * (2 if name == "vmoe-tiny" else 3)
    assert len(inserted) == result.casts
    # every float node of the routing is kept (integer ones have no precision to keep)
    assert result.fp32_nodes["routing"] == len([n for n in routing if float_types(n, types)])
    assert result.size_bytes < 0.8 * fp32.size_bytes  # half the weights, the same graph structure


@pytest.mark.parametrize("reduced", ["fp16", "bf16"])
def test_routing_precision_reduced_keeps_nothing_in_fp32(exported, reduced):
    _, result = exported("vmoe-tiny", precision=reduced, routing_precision="reduced", **VMOE)
    model, types = typed(result.path)
    assert precision(model) == (reduced, "reduced") and "routing" not in result.fp32_nodes
    assert all(float_types(n, types) == {TYPES[reduced]} for n in model.graph.node if n.op_type == "Softmax")
    gates = [g for names in router_tensors(model).values() for g in names.values()]
    assert gates and all(types[g] == TYPES[reduced] for g in gates)
    assert result.casts == 2  # the image in, the logits out


def test_ops_without_the_reduced_type_at_the_opset_stay_fp32(exported, tmp_path):
    """Conv has no BFLOAT16 before opset 22: at 18 the patch embedding stays FP32, at 22 it is BF16."""
    from exporter.export.export import export_onnx
    from exporter.sources.loading import from_zoo, load

    _, at18 = exported("vmoe-tiny", precision="bf16", **VMOE)
    assert at18.fp32_nodes["Conv takes no bfloat16 at opset 18"] == 1
    at22 = export_onnx(load(from_zoo("vmoe-tiny", **VMOE)), tmp_path / "22.onnx", opset=22, precision="bf16")
    assert not any("Conv" in reason for reason in at22.fp32_nodes)
    model, types = typed(at22.path)
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    assert float_types(conv, types) == {TYPES["bf16"]}
    _, fp16 = exported("vmoe-tiny", precision="fp16", **VMOE)
    assert set(fp16.fp32_nodes) == {"routing"}  # every op takes FP16 at opset 18


def _tiny(body: str, initializers: dict[str, np.ndarray]) -> ir.Model:
    model = onnx.parser.parse_model(
        f"""<ir_version: 10, opset_import: ["" : 18]>
        g (float[2, 3] x) => (float[2, 3] y) {{ {body} }}"""
    )
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in initializers.items())
    return ir.from_proto(model)


def test_infinities_stay_infinite_and_overflows_are_reported():
    """The routing masks with -inf: it must survive (onnxconverter-common clamps it to -10000); a
    finite weight beyond FP16's range is reported, not silently made infinite."""
    model = _tiny(
        "m = Constant<value = float[1] {-inf}>()\n a = Add(x, m)\n b = Mul(a, w)\n y = Add(b, big)",
        {"w": np.full((3,), 2.0, np.float32), "big": np.array([1e6], np.float32)},
    )
    result = reduce_precision(model, "fp16")
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    constant = next(n for n in proto.graph.node if n.op_type == "Constant")
    value = onnx.numpy_helper.to_array(constant.attribute[0].t)
    assert value.dtype == np.float16 and np.isneginf(value).all()
    assert result.overflows == ["big"] and result.weights == 2


def test_a_weight_both_sides_read_is_kept_once_per_type():
    """A weight read by a reduced node and by an FP32 routing node: FP32 for the routing, a reduced
    copy for the other (never a Cast of the weight at run time)."""
    model = _tiny(
        "a = Mul(x, w)\n s = Softmax(a)\n r = Mul(s, w)\n y = Add(r, a)", {"w": np.full((3,), 0.5, np.float32)}
    )
    routing = next(n for n in model.graph if n.op_type == "Softmax")
    scope = ": M/layer: exporter.models.vmoe.VMoEMlp/layer.routing: exporter.models.vmoe.TopKRouter/op: x"
    for node in model.graph:
        if node is routing or node.op_type == "Mul" and node.inputs[0].name == "s":
            node.metadata_props["namespace"] = scope
    result = reduce_precision(model, "bf16", vmoe_layers=["layer"])
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert result.shared_weights == 1 and result.fp32_nodes == {"routing": 2}
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    assert kinds == {"w": FLOAT, "w.bf16": TYPES["bf16"]}


def test_bad_precision_arguments_are_user_errors():
    with pytest.raises(UserError, match="precision must be one of"):
        check_precision("int4")
    with pytest.raises(UserError, match="`routing_precision=reduced` needs `precision` fp16 or bf16"):
        check_precision("int8", "reduced")  # a quantized graph's routing is FP32 always
    with pytest.raises(UserError, match="routing precision must be one of"):
        check_precision("fp16", "fp8")
    with pytest.raises(UserError, match="`routing_precision=reduced` needs `precision` fp16 or bf16"):
        check_precision("fp32", "reduced")


@pytest.mark.slow
@pytest.mark.parametrize("reduced", ["fp16", "bf16"])
def test_every_zoo_graph_converts_and_passes_the_checker(reduced):
    """Every zoo V-MoE and Soft-MoE config, weights as typed inputs (uninitialised memory): the
    converted graph types every node (onnx.checker's full check) with the routing in FP32."""
    from exporter.export.export import trace_structure
    from exporter.sources.zoo import VMOE as FAMILY
    from exporter.sources.zoo import ZOO

    for name, config in sorted(ZOO.items()):
        if config.family == "swin_moe":  # reduced precision pins V-MoE and Soft-MoE routers only, so far
            continue
        model = trace_structure(config, routing_outputs=config.family == FAMILY, precision=reduced)
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model)
        _, types = typed_proto(inferred)
        scopes = {n: _module(s) for n, s in node_scopes(model).items()}
        routing = [n for n in model.graph.node if scopes[n.name].endswith((".router", ".routing"))]
        routing = [n for n in routing if ".cast_" not in n.name]
        assert routing and all(float_types(n, types) <= {FLOAT} for n in routing), name
