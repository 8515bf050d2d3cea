"""The plugin registry: names, namespace, ids, and the contract's inputs, outputs and attributes."""

from __future__ import annotations

import pytest

import plugins
from plugins.spec import AttrSpec


def test_registry_lists_six_plugins_in_the_moe_namespace():
    assert plugins.NAMESPACE == "moe"
    assert set(plugins.SPECS) == {
        "TopKRoute",
        "TopKDispatch",
        "TopKCombine",
        "SoftRoute",
        "SoftDispatch",
        "SoftCombine",
    }
    for name, spec in plugins.SPECS.items():
        assert spec.name == name and spec.namespace == "moe"
        assert plugins.plugin_id(name) == f"moe::{name}"
    with pytest.raises(KeyError, match="unknown plugin"):
        plugins.plugin_id("TopK")


@pytest.mark.parametrize(
    ("name", "inputs", "outputs", "attributes"),
    [
        ("TopKRoute", ["gates"], ["expert", "slot", "weight", "slot_token"], ["k", "capacity", "batch_priority"]),
        ("TopKDispatch", ["x", "slot_token"], ["expert_in"], ["num_experts"]),
        ("TopKCombine", ["expert_out", "slot", "weight"], ["y"], ["capacity"]),
        ("SoftRoute", ["logits"], ["dispatch", "combine"], []),
        ("SoftDispatch", ["x", "dispatch"], ["slots"], ["num_experts", "expert_major"]),
        ("SoftCombine", ["slot_out", "combine"], ["y"], ["num_experts", "expert_major"]),
    ],
)
def test_contract_order_and_dtypes(name, inputs, outputs, attributes):
    spec = plugins.SPECS[name]
    assert [t.name for t in spec.inputs] == inputs
    assert [t.name for t in spec.outputs] == outputs
    assert list(spec.attribute_names) == attributes
    assert all(a.type == "int" for a in spec.attributes)
    routing = {"gates", "weight", "logits", "dispatch", "combine"}
    for tensor in (*spec.inputs, *spec.outputs):
        if tensor.name in routing:
            assert tensor.dtypes == ("float32",), tensor
        elif tensor.name in {"expert", "slot", "slot_token"}:
            assert tensor.dtypes == ("int32",), tensor
        else:  # token tensors
            assert tensor.dtypes == ("float32", "float16"), tensor


def test_attribute_types_are_what_the_onnx_parser_passes():
    with pytest.raises(ValueError, match="int, float or str"):
        AttrSpec("pads", "ints")
