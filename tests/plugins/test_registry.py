"""The plugin registry: names, namespace, ids, and the contract's inputs, outputs and attributes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from plugins import registry
from plugins.spec import NAMESPACE, AttrSpec
from plugins.topk_route.capacity import RULE_DEFAULTS


def test_registry_lists_six_plugins_in_the_moe_namespace():
    assert NAMESPACE == "moe" and registry.namespaces() == {"moe"}
    assert set(registry.specs()) == {
        "TopKRoute",
        "TopKDispatch",
        "TopKCombine",
        "SoftRoute",
        "SoftDispatch",
        "SoftCombine",
    }
    for name, spec in registry.specs().items():
        assert spec.name == name and spec.namespace == "moe"
        assert registry.plugin_id(name) == f"moe::{name}"
        assert spec.role in ("routing", "dispatch", "combine")
    with pytest.raises(KeyError, match="unknown plugin"):
        registry.plugin_id("TopK")


@pytest.mark.parametrize(
    ("name", "inputs", "outputs", "attributes"),
    [
        (
            "TopKRoute",
            ["gates"],
            ["expert", "slot", "weight", "slot_token"],
            ["k", "capacity", "batch_priority", "by_token", "normalize", "eps", *RULE_DEFAULTS],
        ),
        ("TopKDispatch", ["x", "slot_token"], ["expert_in"], ["num_experts"]),
        ("TopKCombine", ["expert_out", "slot", "weight"], ["y"], []),
        ("SoftRoute", ["logits"], ["dispatch", "combine"], []),
        ("SoftDispatch", ["x", "dispatch"], ["slots"], ["num_experts", "expert_major"]),
        ("SoftCombine", ["slot_out", "combine"], ["y"], ["num_experts", "expert_major"]),
    ],
)
def test_contract_order_and_dtypes(name, inputs, outputs, attributes):
    spec = registry.spec(name)
    assert [t.name for t in spec.inputs] == inputs
    assert [t.name for t in spec.outputs] == outputs
    assert list(spec.attribute_names) == attributes
    assert all(a.type == ("float" if a.name == "eps" else "int") for a in spec.attributes)
    routing = {"gates", "weight", "logits", "dispatch", "combine"}
    for tensor in (*spec.inputs, *spec.outputs):
        if tensor.name in routing:
            assert tensor.dtypes == ("float32",), tensor
        elif tensor.name in {"expert", "slot", "slot_token"}:
            assert tensor.dtypes == ("int32",), tensor
        else:  # token tensors
            assert tensor.dtypes == ("float32", "float16", "bfloat16"), tensor


def test_attribute_types_are_what_the_onnx_parser_passes():
    with pytest.raises(ValueError, match="int, float or str"):
        AttrSpec("pads", "ints")


# --- a seventh plugin: one folder plus one registry line -----------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def seventh_plugin(monkeypatch):
    """``tests/fixtures/plugins_extra/scale`` registered by the one line a new plugin adds."""
    import plugins

    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setattr(plugins, "PLUGINS", (*plugins.PLUGINS, "plugins_extra.scale"))
    return registry.spec("Scale")


def _scale_graph(path: Path, factor: int = 3) -> Path:
    node = helper.make_node("Scale", ["x"], ["y"], domain="moe", factor=factor, plugin_namespace="moe", aot=1)
    graph = helper.make_graph(
        [node],
        "scale",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 8])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("moe", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)  # what ONNX Runtime 1.30 reads too
    onnx.save(model, path)
    return path


def test_a_seventh_plugin_is_seen_by_the_rewrite_the_engine_check_and_aot(seventh_plugin, tmp_path):
    from exporter.backends.onnxruntime import run_onnxruntime
    from exporter.backends.tensorrt import plugin_nodes
    from exporter.deploy.ptx import plugin_node_shapes
    from exporter.errors import UserError
    from exporter.rewrite.plan import LayerPlan, PluginNode, RewriteResult
    from exporter.rewrite.rewrite import plan_rewrite, plugin_functions
    from plugins import aot

    assert seventh_plugin.id == "moe::Scale" and list(registry.specs())[-1] == "Scale"
    path = _scale_graph(tmp_path / "scale.onnx")
    model = onnx.load(path)

    # the rewrite: attaches its local function, counts it, and knows a graph holding it was rewritten
    model.functions.extend(plugin_functions(model))
    assert [f.name for f in model.functions] == ["Scale"]
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    x = np.arange(64, dtype=np.float32).reshape(2, 4, 8)
    np.testing.assert_array_equal(run_onnxruntime(path, {"x": x})["y"], 3 * x)
    result = RewriteResult(path, None, [LayerPlan("l", "test", [PluginNode("Scale", {"factor": 3})])], 0.0)
    assert result.counts == {"Scale": 1} and result.to_dict()["layers"][0]["plugins"][0]["role"] == "combine"
    with pytest.raises(UserError, match="already holds moe:: plugin nodes"):
        plan_rewrite(path)

    # the engine's plugin check counts it
    assert plugin_nodes(path) == {"Scale": 1}

    # AOT: the bundle's shape probe and kernel list include it, and its kernel is found by name
    ((op, attrs, shapes, dtype),) = plugin_node_shapes(path, seed=0)
    assert (op, attrs["factor"], shapes, dtype) == ("Scale", 3, [(2, 4, 8)], "float32")
    recipes = aot.node_recipes(op, shapes, attrs)
    assert [r.inputs[0][1] for r in recipes] == ["float32", "float16"]
    assert recipes[0].scalar_values == (64, 3)
    pytest.importorskip("triton", reason="finding the kernel imports Triton")
    assert aot.kernel_for(recipes[0]) is registry.module("Scale", "kernels").kernel()


def test_without_its_registry_line_the_plugin_is_unknown(tmp_path):
    from exporter.backends.tensorrt import plugin_nodes

    path = _scale_graph(tmp_path / "scale.onnx")
    assert plugin_nodes(path) == {}
    with pytest.raises(KeyError, match="unknown plugin 'Scale'"):
        registry.spec("Scale")
