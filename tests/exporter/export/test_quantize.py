"""INT8/FP8 Q/DQ graphs and weight-only expert weights: what is quantized and what stays FP32 (no
DequantizeLinear feeds a router or a gate), each expert's own scales, the calibration's token counts
against PyTorch's routing, the stored weights against the formulas, and the graphs running in ONNX Runtime.

The quantized graphs are made from the session's FP32 exports (``exported``) by the pass itself, so
no test traces a model again but the one that validates an int8 export end to end."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from exporter import settings
from exporter.backends.onnxruntime import session
from exporter.backends.tensorrt_rtx import rtx_available
from exporter.errors import UserError
from exporter.export.precision import soft_routing_nodes, vmoe_routing_nodes
from exporter.export.quantize import quantize
from exporter.formats.graph import PRECISION_KEY, SHAPE_OPS, module_path, precision
from exporter.models.capture import capture_routing
from exporter.sources.loading import load

VMOE = dict(capacity_factor=0.5, batch_priority=True)  # drops tokens, priorities decide
MOE_LAYERS = {"vmoe-tiny": ["blocks.1.mlp", "blocks.3.mlp"], "soft-moe-tiny": ["blocks.2.mlp", "blocks.3.mlp"]}


def _fp32(exported, name):
    return exported(name, **(VMOE if name == "vmoe-tiny" else {}))


def _images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 32, 32), dtype=np.float32)


def _quantized(exported, name, precision_name, images=None):
    """(original onnx_ir model, quantized one, QuantizeResult)."""
    _, result = _fp32(exported, name)
    original, model = ir.load(str(result.path)), ir.load(str(result.path))
    calibration = (
        None if precision_name in settings.WEIGHT_ONLY_PRECISIONS else (_images(16) if images is None else images)
    )
    done = quantize(model, precision_name, moe_layers=MOE_LAYERS[name], images=calibration, batch=8)
    model.metadata_props[PRECISION_KEY] = json.dumps({"precision": precision_name, "routing": "fp32"})
    return original, model, done


def _producer_through_shapes(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    while node is not None and node.op_type in SHAPE_OPS:
        node = node.inputs[0].producer()
    return node


def _routing_names(original: ir.Model, layers) -> set[str]:
    """Names of every node of the routing in the FP32 graph: router, gates' softmax, routing math,
    dispatch and combine (all but the experts of each MoE layer), and a Soft-MoE's logits and softmaxes."""
    graph = original.graph
    found = {n.name for n in vmoe_routing_nodes(graph, layers) | soft_routing_nodes(graph)}
    for node in graph:
        path = module_path(node.metadata_props.get("namespace", ""))
        for layer in layers:
            inside = any(p == layer or p.startswith(layer + ".") for p in path)
            if inside and not any(p.startswith(f"{layer}.experts") for p in path):
                found.add(node.name)
    return found


@pytest.mark.parametrize("precision_name", ["int8", "fp8"])
@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_no_dequantize_feeds_a_router_or_gate_and_the_rest_is_quantized(exported, name, precision_name):
    original, model, done = _quantized(exported, name, precision_name)
    routing = _routing_names(original, MOE_LAYERS[name])
    assert len(routing) > 20
    by_name = {n.name: n for n in model.graph}
    assert routing <= set(by_name)  # nothing of the routing was replaced
    for node_name in routing:
        for value in by_name[node_name].inputs:
            if value is not None:
                producer = _producer_through_shapes(value)
                assert producer is None or producer.op_type != "DequantizeLinear", (node_name, value.name)
    # LayerNorm, softmax, GELU and the residual adds read no dequantized tensor either
    for node in model.graph:
        if node.op_type in ("LayerNormalization", "Softmax", "Add", "Tanh", "Mul", "Div", "Sub", "Pow"):
            for value in node.inputs:
                if value is not None:
                    producer = _producer_through_shapes(value)
                    assert producer is None or producer.op_type != "DequantizeLinear", (node.name, value.name)
    # every MatMul/Gemm/Conv outside the routing reads only dequantized tensors (biases aside)
    compute = [n for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in routing]
    assert {n.op_type for n in compute} == {"MatMul", "Gemm", "Conv"}
    for node in compute:
        for value in node.inputs[:2]:
            assert _producer_through_shapes(value).op_type == "DequantizeLinear", (node.name, value.name)
    assert sum(done.quantized_nodes.values()) == len(compute)
    qtype = ir.DataType.INT8 if precision_name == "int8" else ir.DataType.FLOAT8E4M3FN
    quantizers = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    assert quantizers and all(n.outputs[0].dtype == qtype for n in quantizers)
    # symmetric: every zero point is 0; the graph is valid ONNX and runs in ONNX Runtime on CPU
    for node in [*quantizers, *(n for n in model.graph if n.op_type == "DequantizeLinear")]:
        assert not np.any(node.inputs[2].const_value.numpy().astype(np.float32))
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert precision(proto) == (precision_name, "fp32")
    outputs = session(proto).run(None, {"images": _images(8, seed=2)})
    assert np.isfinite(outputs[0]).all()


def test_each_expert_has_its_own_scales(exported):
    _, model, _ = _quantized(exported, "vmoe-tiny", "int8")
    _, result = _fp32(exported, "vmoe-tiny")
    weights = {n: v.const_value.numpy() for n, v in ir.load(str(result.path)).graph.initializers.items()}
    for layer in MOE_LAYERS["vmoe-tiny"]:
        w1 = weights[f"{layer}.experts.w1"]  # [E, K, N]
        experts, k, n = w1.shape
        stored = model.graph.initializers[f"{layer}.experts.w1.int8"].const_value.numpy()
        scale = model.graph.initializers[f"{layer}.experts.w1.int8.scale"].const_value.numpy()
        assert stored.dtype == np.int8 and stored.shape == (k, experts * n) and scale.shape == (experts * n,)
        # one scale per expert and output channel: the largest magnitude of that column maps to 127
        np.testing.assert_allclose(scale.reshape(experts, n), np.abs(w1).max(axis=1) / 127, rtol=1e-6)
        back = (stored.astype(np.float32) * scale).reshape(k, experts, n).transpose(1, 0, 2)
        assert np.abs(back - w1).max() <= scale.max() / 2 + 1e-7
        # the expert activations: one scale per expert (a per-axis Q/DQ on the expert axis)
        (matmul,) = [
            m
            for m in model.graph
            if m.op_type == "MatMul"
            and (p := _producer_through_shapes(m.inputs[1])) is not None
            and p.inputs[0].name == f"{layer}.experts.w1.int8"
        ]
        dq = matmul.inputs[0].producer()
        assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].value == 0
        assert dq.inputs[1].const_value.numpy().shape == (experts,)


def test_calibration_counts_the_tokens_each_expert_saw_as_pytorch_routes_them(exported, monkeypatch):
    source, _ = _fp32(exported, "vmoe-tiny")
    images = _images(16, seed=3)
    model = load(source).module
    with torch.no_grad(), capture_routing() as records:
        model(torch.from_numpy(images[:8]))
        model(torch.from_numpy(images[8:]))
    expected = {}
    for name, (_, routing) in zip(MOE_LAYERS["vmoe-tiny"] * 2, records):
        kept = routing.expert[routing.slot >= 0]
        counts = np.bincount(kept.numpy().ravel(), minlength=4)
        expected[name] = expected.get(name, 0) + counts
    monkeypatch.setattr(settings, "CALIBRATION_MIN_EXPERT_TOKENS", int(min(c.min() for c in expected.values())) + 1)
    _, _, done = _quantized(exported, "vmoe-tiny", "int8", images=images)
    assert done.expert_tokens == {k: [int(c) for c in v] for k, v in expected.items()}
    assert done.calibration_images == 16
    # the expert (or experts) that saw the fewest tokens is warned about, by layer and index
    assert done.warnings and any("calibration tokens" in w and "blocks." in w for w in done.warnings)


@pytest.mark.parametrize("precision_name", ["w8", "w4"])
def test_weight_only_quantizes_the_expert_weights_only(exported, precision_name):
    _, result = _fp32(exported, "vmoe-tiny")
    weights = {n: v.const_value.numpy() for n, v in ir.load(str(result.path)).graph.initializers.items()}
    _, model, done = _quantized(exported, "vmoe-tiny", precision_name)
    assert not [n for n in model.graph if n.op_type == "QuantizeLinear"]  # no activation is quantized
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 4  # w1 and w2 of both MoE layers
    assert done.quantized_nodes == {"MatMul": 4}
    experts, k, n = weights["blocks.1.mlp.experts.w1"].shape
    if precision_name == "w8":  # INT8, one FP32 scale per expert and channel
        stored = experts * k * n + 4 * experts * n
    else:  # INT4 (two a byte) and one FP32 scale per block of W4_BLOCK along K
        blocks = -(-k // min(settings.W4_BLOCK, k))
        stored = experts * k * n // 2 + 4 * experts * blocks * n
        assert model.graph.opset_imports[""] == settings.QUANTIZED_OPSET
        node = next(d for d in dequantize if d.inputs[0].name == "blocks.1.mlp.experts.w1.w4")
        assert node.attributes["block_size"].value == min(settings.W4_BLOCK, k)
    w2 = weights["blocks.1.mlp.experts.w2"].shape
    stored2 = stored // (k * n) * (w2[1] * w2[2]) if precision_name == "w8" else None
    assert done.expert_weight_bytes[0] == 4 * 2 * (experts * k * n + int(np.prod(w2)))
    if stored2 is not None:
        assert done.expert_weight_bytes[1] == 2 * (stored + experts * w2[1] * w2[2] + 4 * experts * w2[2])
    # the dequantized weights are within half a step of the originals, and the graph runs
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    fp32_out = session(str(result.path)).run(None, {"images": _images(8, seed=4)})[0]
    out = session(proto).run(None, {"images": _images(8, seed=4)})[0]
    bound = 0.05 if precision_name == "w8" else 0.5
    assert np.abs(out - fp32_out).max() / np.abs(fp32_out).max() < bound


def test_int4_blocks_hold_the_weights_to_half_a_step():
    """A batched expert MatMul whose contracted axis (100) is not a multiple of the block."""
    w = np.random.default_rng(0).standard_normal((2, 100, 3)).astype(np.float32)
    weight = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(w.shape))
    weight.const_value = ir.tensor(w, name="w")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 100]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 3]))
    matmul = ir.Node("", "MatMul", [x, weight], outputs=[y], name="experts_matmul")
    matmul.metadata_props["namespace"] = "moe: M/moe.experts: E/matmul: aten.matmul.default"
    graph = ir.Graph([x], [y], nodes=[matmul], initializers=[weight], opset_imports={"": 18})
    done = quantize(ir.Model(graph, ir_version=10), "w4", moe_layers=["moe"])
    assert done.quantized_nodes == {"MatMul": 1} and graph.opset_imports[""] == settings.QUANTIZED_OPSET
    dq = matmul.inputs[1].producer()
    q = dq.inputs[0].const_value.numpy().astype(np.float32)
    scale = dq.inputs[1].const_value.numpy()
    block = dq.attributes["block_size"].value
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT4 and "w" not in graph.initializers
    assert np.abs(q).max() <= 7 and scale.shape == (2, -(-100 // block), 3)
    steps = np.repeat(scale, block, axis=1)[:, :100]
    assert np.all(np.abs(q * steps - w) <= steps / 2 + 1e-7)
    assert done.expert_weight_bytes == (w.nbytes, w.size // 2 + scale.nbytes)
    x_value = np.random.default_rng(1).standard_normal((2, 5, 100)).astype(np.float32)
    (out,) = session(ir.to_proto(ir.Model(graph, ir_version=10))).run(None, {"x": x_value})
    np.testing.assert_allclose(out, x_value @ (q * steps), rtol=1e-5, atol=1e-5)


def test_fp8_weights_round_as_ml_dtypes_does(exported):
    _, result = _fp32(exported, "soft-moe-tiny")
    w1 = ir.load(str(result.path)).graph.initializers["blocks.2.mlp.experts.w1"].const_value.numpy()
    _, model, _ = _quantized(exported, "soft-moe-tiny", "fp8")
    stored = model.graph.initializers["blocks.2.mlp.experts.w1.fp8"].const_value.numpy()
    scale = model.graph.initializers["blocks.2.mlp.experts.w1.fp8.scale"].const_value.numpy()
    experts, k, n = w1.shape
    want = (w1 / scale.reshape(experts, 1, n)).astype(ml_dtypes.float8_e4m3fn).transpose(1, 0, 2).reshape(k, -1)
    assert stored.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(stored.astype(np.float32), want.astype(np.float32))


def test_fp8_emulation_is_the_arithmetic_of_onnx_runtimes_own_fp8_kernels(exported):
    """The emulation (weights dequantized through ml_dtypes, a Cast pair per Q/DQ) against ONNX Runtime's
    own FP8 QuantizeLinear/DequantizeLinear kernels, where this ONNX Runtime has them."""
    import onnxruntime as ort

    from exporter.backends.emulation import emulated, emulation_type

    _, model, _ = _quantized(exported, "soft-moe-tiny", "fp8")
    proto = ir.to_proto(model)
    assert emulation_type(proto) == ir.DataType.FLOAT8E4M3FN
    fake = emulated(proto, ir.DataType.FLOAT8E4M3FN)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in fake.graph.node}
    assert not [t for t in fake.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    images = _images(8, seed=5)
    try:
        native = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # an ONNX Runtime without FP8 kernels on CPU: the emulation is all there is
        pytest.skip(f"this ONNX Runtime cannot run FP8 Q/DQ on CPU to compare with ({type(e).__name__})")
    want = native.run(None, {"images": images})[0]
    got = session(proto).run(None, {"images": images})[0]  # session() runs FP8 graphs emulated
    # the same rounding; only the FP32 accumulation order differs, moving an element across an FP8 rounding
    # boundary now and then
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-2


def test_an_int8_export_validates_with_every_flip_explained(exported):
    from exporter.parity.validate import validate_onnx

    _, result = exported("vmoe-tiny", precision="int8", **VMOE)
    assert result.quantization["calibration"].startswith("no `calibration`: 32 seeded N(0, 1) images")
    report = validate_onnx(result.path)
    assert report.precision == "int8" and report.passed
    assert all(r.flip_count > 0 and r.unexplained == 0 for r in report.routing)  # INT8 flips near-ties ...
    assert all(r.decisions >= settings.TOLERANCES["int8"].routing_agreement for r in report.routing)
    assert all(f["cause"] in ("gates", "cascade") for r in report.routing for f in r.flips)  # ... each explained


NO_RTX = rtx_available()


@pytest.mark.skipif(NO_RTX is not None, reason=f"needs TensorRT for RTX (pip install tensorrt-rtx-cu12): {NO_RTX}")
@pytest.mark.parametrize("precision_name", ["int8", "fp8"])
def test_tensorrt_for_rtx_builds_the_quantized_graph_on_cpu(exported, tmp_path, precision_name):
    from exporter.backends.tensorrt import EngineOptions
    from exporter.deploy.engines import build_rtx_engines

    _, model, _ = _quantized(exported, "vmoe-tiny", precision_name)
    graph = tmp_path / f"tiny.{precision_name}.onnx"
    ir.save(model, str(graph))
    built = build_rtx_engines(graph, tmp_path, ["sm_89"], EngineOptions(opt_level=0), batch_multiple=8)
    (build,) = built.builds
    assert build.precision == precision_name and build.target == "sm_89"
    assert build.path.stat().st_size > 0 and not build.ran  # built on a CPU; run where an RTX 40 GPU is
    if precision_name == "fp8":  # a target without FP8 is refused before any build, in one line
        with pytest.raises(UserError, match="cannot target sm_86: FP8 needs sm_89 or newer"):
            build_rtx_engines(graph, tmp_path / "old", ["sm_86"], EngineOptions(opt_level=0), batch_multiple=8)


def test_another_authors_router_is_found_by_the_choice_it_feeds():
    """A MatMul whose logits reach a TopK through a softmax stays FP32 without any module name; a MatMul
    feeding anything else is quantized."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
        value.const_value = ir.tensor(rng.standard_normal(shape).astype(np.float32), name=name)
        return value

    def out(name, dtype=ir.DataType.FLOAT):
        return ir.Value(name=name, type=ir.TensorType(dtype))

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8, 16]))
    router_w, dense_w = weight("router_w", [16, 4]), weight("dense_w", [16, 16])
    k = ir.Value(name="k", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    k.const_value = ir.tensor(np.array([2], np.int64), name="k")
    router = ir.Node("", "MatMul", [x, router_w], outputs=[out("logits")], name="router")
    softmax = ir.Node("", "Softmax", [router.outputs[0]], outputs=[out("gates")], name="gates")
    topk = ir.Node("", "TopK", [softmax.outputs[0], k], outputs=[out("top"), out("index", ir.DataType.INT64)])
    dense = ir.Node("", "MatMul", [x, dense_w], outputs=[out("hidden")], name="dense")
    relu = ir.Node("", "Relu", [dense.outputs[0]], outputs=[out("y")])
    graph = ir.Graph(
        [x], [topk.outputs[0], relu.outputs[0]], nodes=[router, softmax, topk, dense, relu],
        initializers=[router_w, dense_w, k], opset_imports={"": 18},
    )  # fmt: skip
    done = quantize(ir.Model(graph, ir_version=10), "int8", images=rng.standard_normal((8, 16)).astype(np.float32))
    assert done.float_nodes == {"router (feeds a top-k choice)": 1} and done.quantized_nodes == {"MatMul": 1}
    assert all(v.producer() is None for v in router.inputs)  # the router reads x and its FP32 weight as they were
    assert {v.producer().op_type for v in dense.inputs} == {"DequantizeLinear"}
