"""BF16 on a CPU: the emulated FP32 graph rounds every BF16 tensor where it is made, keeps the names,
and is used only where a node computes on BF16."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from exporter.backends.emulation import emulated, needs_emulation
from exporter.backends.onnxruntime import run, session


def _graph(body: str, inputs: str = "float[4] x", outputs: str = "float[4] y", weights: dict | None = None):
    model = onnx.parser.parse_model(
        f"""<ir_version: 10, opset_import: ["" : 18]> g ({inputs}) => ({outputs}) {{ {body} }}"""
    )
    for name, array in (weights or {}).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return onnx.shape_inference.infer_shapes(model)


def bf16(values) -> np.ndarray:
    return np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_every_bf16_tensor_is_rounded_where_it_is_made():
    """y = ((bf16(x) * w) + w) back to float: each product and sum is rounded to BF16 before it is read."""
    w = np.array([1.0 + 2**-7, 3.0, -1.5, 1e-3], np.float32).astype(ml_dtypes.bfloat16)
    model = _graph("b = Cast<to = 16>(x)\n p = Mul(b, w)\n s = Add(p, w)\n y = Cast<to = 1>(s)", weights={"w": w})
    assert needs_emulation(model)
    x = np.array([1.0 + 2**-8 + 2**-9, 2.7182817, 0.3333, -7.77], np.float32)
    (y,) = run(session(model.SerializeToString()), {"x": x}).values()
    wf = w.astype(np.float32)
    expected = bf16(bf16(bf16(x) * wf) + wf)
    np.testing.assert_array_equal(y, expected)
    assert not np.array_equal(y, bf16(x) * wf + wf)  # the intermediate rounding is there

    copy = emulated(model)
    names = {o for n in copy.graph.node for o in n.output}
    assert {"b", "p", "s", "y"} <= names  # any tensor can still be read by its name
    assert {t.data_type for t in copy.graph.initializer} == {onnx.TensorProto.FLOAT}


def test_fp32_graphs_and_bf16_round_trips_run_as_they_are():
    """An FP32 graph, and one that only rounds through BF16 with a Cast pair (--bf16-dispatch), need
    no emulation: ONNX Runtime runs BF16 Casts itself."""
    plain = _graph("y = Relu(x)")
    round_trip = _graph("b = Cast<to = 16>(x)\n y = Cast<to = 1>(b)")
    assert not needs_emulation(plain) and not needs_emulation(round_trip)
    x = np.array([1.0 + 2**-8 + 2**-9, 2.0, 3.1, -4.0], np.float32)
    (y,) = run(session(round_trip.SerializeToString()), {"x": x}).values()
    np.testing.assert_array_equal(y, bf16(x))


def test_fp16_emulation_is_numpy_fp16_arithmetic():
    """The same rounding model for FP16 is NumPy's float16 arithmetic, overflow included (300² is inf).
    ONNX Runtime's own FP16 run computes ops without FP16 kernels in FP32 and can skip the rounding in
    between, which is why the benchmarks show both (benchmarks/precision.py)."""
    model = _graph("h = Cast<to = 10>(x)\n p = Mul(h, h)\n y = Cast<to = 1>(p)")
    x = np.array([1.0009765625, 3.14159, -2.5, 300.0], np.float32)
    copy = emulated(model, ir.DataType.FLOAT16)
    with np.errstate(over="ignore"):
        expected = (x.astype(np.float16) * x.astype(np.float16)).astype(np.float32)
    (y,) = run(session(copy.SerializeToString()), {"x": x}).values()
    np.testing.assert_array_equal(y, expected)
    assert np.isinf(y[-1])


def test_bf16_inputs_are_refused():
    model = _graph("y = Relu(x)", inputs="bfloat16[4] x", outputs="bfloat16[4] y")
    with pytest.raises(ValueError, match="emulation keeps the graph's inputs"):
        emulated(model)


def test_a_tensor_exposed_as_an_output_is_rounded_too():
    """A tensor read by name (declared as an output without a type, as validate and the rewrite's
    probe do) is the rounded one, and so is what its consumers read."""
    model = _graph("b = Cast<to = 16>(x)\n p = Mul(b, b)\n y = Cast<to = 1>(p)")
    model.graph.output.append(onnx.ValueInfoProto(name="p"))
    x = np.array([1.0 + 2**-8 + 2**-9, 2.7182817, 0.3333, -7.77], np.float32)
    out = run(session(model.SerializeToString()), {"x": x})
    expected = bf16(bf16(x) * bf16(x))
    np.testing.assert_array_equal(out["p"], expected)
    np.testing.assert_array_equal(out["y"], expected)


def test_a_graph_with_its_weights_beside_it_is_emulated_weight_by_weight(tmp_path):
    """The big-model path (weights in a .data file): converted into a temporary folder one weight at
    a time, with the same result as the in-memory emulation."""
    from exporter.backends.onnxruntime import run_onnxruntime

    w = np.linspace(-3, 3, 4, dtype=np.float32).astype(ml_dtypes.bfloat16)
    model = _graph("b = Cast<to = 16>(x)\n p = Mul(b, w)\n y = Cast<to = 1>(p)", weights={"w": w})
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer[0].data_location == 1
    x = np.array([1.0 + 2**-8 + 2**-9, 2.7182817, 0.3333, -7.77], np.float32)
    (y,) = run_onnxruntime(tmp_path / "m.onnx", {"x": x}).values()
    np.testing.assert_array_equal(y, bf16(bf16(x) * w.astype(np.float32)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing left behind
