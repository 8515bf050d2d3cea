"""The generic V3 plugin (``plugins/v3.py``) on CPU: each plugin's ``shapes.py`` against its reference's
outputs, the kernel variant chosen at build and at run time, the creators' attributes and their
serialisation, and a capacity that follows the group size through TensorRT for RTX's expression
builder. Its ``enqueue`` runs on an RTX GPU (``rtx_gpu`` tests in tests/exporter/backends)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from exporter.backends.tensorrt_rtx import rtx_available
from plugins import registry
from plugins.topk_route.capacity import capacity as capacity_of
from plugins.v3 import Unknown, recipe_dims

NO_RTX = rtx_available()
needs_rtx = pytest.mark.skipif(NO_RTX is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")
ROUTE = dict(k=2, capacity=3, batch_priority=1)
RULE = dict(k=2, capacity=0, batch_priority=0, cap_num=5, cap_den=16, cap_ceil=0, cap_clamp=1, cap_min=4)


def _cases():
    """(plugin, its reference's inputs, its attributes): each plugin on small random tensors."""
    g = torch.Generator().manual_seed(0)
    gates = torch.softmax(torch.randn(2, 10, 4, generator=g), -1)
    route = registry.module("TopKRoute", "reference").topk_route
    expert, slot, weight, slot_token = route(gates, **ROUTE)
    logits = torch.randn(2, 5, 6, generator=g)
    dispatch, combine = registry.module("SoftRoute", "reference").soft_route(logits)
    x = torch.randn(2, 10, 8, generator=g).half()
    tokens = torch.randn(2, 5, 8, generator=g).to(torch.bfloat16)
    return [
        ("TopKRoute", (gates,), ROUTE),
        ("TopKRoute", (torch.softmax(torch.randn(2, 40, 4, generator=g), -1),), RULE),
        ("TopKDispatch", (x, slot_token), dict(num_experts=4)),
        ("TopKCombine", (torch.randn(4, 2 * 3, 8, generator=g), slot, weight), {}),
        ("SoftRoute", (logits,), {}),
        ("SoftDispatch", (tokens, dispatch), dict(num_experts=3, expert_major=1)),
        ("SoftDispatch", (tokens, dispatch), dict(num_experts=3, expert_major=0)),
        ("SoftCombine", (torch.randn(3, 2 * 2, 8, generator=g), combine), dict(num_experts=3, expert_major=1)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_shapes_py_gives_the_shapes_and_types_of_the_reference(case):
    op, inputs, attrs = _cases()[case]
    reference = registry.module(op, "reference")
    fn = next(getattr(reference, n) for n in dir(reference) if n.replace("_", "") == op.lower())
    outputs = fn(*inputs, **attrs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    shapes = registry.module(op, "shapes")
    values = registry.spec(op).attribute_values(attrs)
    dims = shapes.output_shapes([tuple(t.shape) for t in inputs], **values)
    dtypes = shapes.output_dtypes([str(t.dtype).removeprefix("torch.") for t in inputs], **values)
    assert [tuple(int(d) for d in s) for s in dims] == [tuple(o.shape) for o in outputs]
    assert list(dtypes) == [str(o.dtype).removeprefix("torch.") for o in outputs]


def test_a_dynamic_dimension_picks_one_kernel_variant_at_build_and_at_run_time():
    """The build sees -1 where the profile lets a dimension vary; the run, its size. Both evaluate the
    node's recipe with that dimension marked dynamic: the same compiled variant, and the run's grid
    and scalars are those of the actual sizes."""
    kernels = registry.module("TopKRoute", "kernels")
    values = registry.spec("TopKRoute").attribute_values(RULE)
    build = kernels.node_recipe([recipe_dims((-1, -1, 4))], "float32", **values)
    run = kernels.node_recipe([recipe_dims((3, 40, 4), [0, 1])], "float32", **values)
    plain = kernels.node_recipe([(3, 40, 4)], "float32", **values)
    assert build.key() == run.key() == plain.key()
    assert [int(v) for v in run.scalar_values] == list(plain.scalar_values) == [40, 4, capacity_of(40, values)]
    assert [int(g) for g in run.grid] == list(plain.grid)
    with pytest.raises(ValueError, match="no value while building"):
        int(build.scalar_values[0])
    assert max(Unknown(7), 4).value == 7 and min(Unknown(7), 4) == 4 and max(Unknown(), 4).value is None


@needs_rtx
def test_creators_take_the_spec_attributes_and_serialise_them_with_the_kernel():
    import tensorrt_rtx as trt

    from plugins import v3

    assert v3.register_all(trt) == [s.id for s in registry.specs().values()]
    creator = trt.get_plugin_registry().get_creator("TopKRoute", "1", "moe")
    assert [f.name for f in creator.field_names] == list(registry.spec("TopKRoute").attribute_names)
    given = [trt.PluginField(n, np.array([v], np.int32), trt.PluginFieldType.INT32) for n, v in ROUTE.items()]
    plugin = creator.create_plugin("route", trt.PluginFieldCollection(given), trt.TensorRTPhase.BUILD)
    assert plugin.attrs == registry.spec("TopKRoute").attribute_values(ROUTE)  # the defaults filled in
    assert plugin.num_outputs == 4 and plugin.get_output_data_types([trt.float32]) == [
        trt.int32,
        trt.int32,
        trt.float32,
        trt.int32,
    ]
    plugin.kernel = {"key": "k", "name": "n", "ptx": ".version 8.5", "shared": 0, "num_warps": 4, "arch": 89}
    again = creator.create_plugin("route", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.attrs == plugin.attrs and again.kernel == plugin.kernel
    with pytest.raises(Exception):  # noqa: B017 (the binding wraps the KeyError naming the attribute)
        creator.create_plugin("route", trt.PluginFieldCollection(given[:1]), trt.TensorRTPhase.BUILD)
    assert any("lacks its attribute 'capacity'" in e for e in v3.errors())


def _route_graph(path, tokens, **attrs):
    node = helper.make_node(
        "TopKRoute",
        ["gates"],
        ["expert", "slot", "weight", "slot_token"],
        name="route",
        domain="moe",
        plugin_namespace="moe",
        **attrs,
    )
    outputs = [
        helper.make_tensor_value_info(n, t, None)
        for n, t in zip(node.output, [onnx.TensorProto.INT32] * 2 + [onnx.TensorProto.FLOAT, onnx.TensorProto.INT32])
    ]
    gates = helper.make_tensor_value_info("gates", onnx.TensorProto.FLOAT, ["G", tokens, 4])
    graph = helper.make_graph([node], "route", [gates], outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("moe", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


@needs_rtx
def test_a_capacity_rule_sizes_the_slot_table_in_the_real_builder(tmp_path):
    """capacity 0: the slot table's width is E times the rule of S, evaluated by TensorRT's expression
    builder (``shapes.py`` with the builder's max/min) when S is a build-time dimension, and built
    (kernel included) when S follows the profile."""
    from exporter.backends.tensorrt_rtx import build_engine

    static = build_engine(_route_graph(tmp_path / "s.onnx", 40, **RULE), tmp_path / "s.engine", 89)
    ((expert, _, _, table),) = static.plugin_outputs.values()
    assert table == [[-1, 4 * capacity_of(40, RULE)], "INT32"] and expert == [[-1, 40, 2], "INT32"]
    dynamic = _route_graph(tmp_path / "d.onnx", "S", **RULE)
    built = build_engine(dynamic, tmp_path / "d.engine", 89, input_shape=(40, 4))
    ((*_, table),) = built.plugin_outputs.values()
    assert table[0] == [-1, -1] and built.plugin_layers == {"TopKRoute": 1}
