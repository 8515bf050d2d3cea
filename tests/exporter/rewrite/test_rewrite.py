"""The plugin rewrite: one routing, dispatch and combine plugin per MoE layer, checked by value, and
the rewritten graph validated against PyTorch on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from exporter.errors import UserError
from exporter.export.export import export_onnx
from exporter.formats.graph import REWRITE_KEY
from exporter.parity.validate import validate_onnx
from exporter.rewrite.rewrite import rewrite_onnx
from exporter.sources.loading import from_module, from_zoo, load
from plugins.spec import NAMESPACE

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "user_modules.py"


def _plugin_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == NAMESPACE]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize(
    "name, overrides",
    [("vmoe-tiny", {}), ("vmoe-tiny", dict(capacity_factor=0.5, batch_priority=True, k=1)), ("soft-moe-tiny", {})],
)
def test_zoo_tiny_models_rewrite_and_validate(exported, tmp_path, name, overrides):
    source, result = exported(name, **overrides)
    out = tmp_path / "plugins.onnx"
    rewritten = rewrite_onnx(result.path, out)
    layers = load(source).moe_layers
    kinds = (
        ("TopKRoute", "TopKDispatch", "TopKCombine")
        if name.startswith("vmoe")
        else ("SoftRoute", "SoftDispatch", "SoftCombine")
    )
    assert rewritten.counts == {kind: len(layers) for kind in kinds}
    assert [layer.layer for layer in rewritten.layers] == layers and not rewritten.declined

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert sorted(f.name for f in model.functions) == sorted(kinds)
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 18), (NAMESPACE, 1)}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[REWRITE_KEY]) == rewritten.counts and "moe_export.source" in meta
    for node in _plugin_nodes(out):
        attrs = _attrs(node)
        assert attrs["plugin_namespace"] == NAMESPACE.encode() and attrs["aot"] == 1
        assert all(isinstance(v, (int, float, bytes)) for v in attrs.values())  # INT/FLOAT/STRING only
        if node.op_type == "TopKRoute":
            config = source.config
            assert attrs["k"] == config.k and attrs["batch_priority"] == int(config.batch_priority)
            assert attrs["capacity"] == load(source).module.blocks[1].mlp.capacity(8 * config.tokens)
    # the routing/dispatch/combine subgraphs are gone: no scatter, argmax or top-1 masking left
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"ScatterElements", "ArgMax", "GatherElements"}

    report = validate_onnx(out, source)
    assert report.passed, report.to_dict()
    assert all(r.agreement == 1.0 for r in report.routing)
    if name.startswith("vmoe"):
        assert report.routing and all(r.dropped_expected > 0 for r in report.routing)


def test_plan_only_writes_nothing(exported, tmp_path):
    _, result = exported("vmoe-tiny")
    out = tmp_path / "never.onnx"
    plan = rewrite_onnx(result.path, out, plan_only=True)
    assert plan.path is None and not out.exists() and not list(tmp_path.iterdir())
    assert plan.counts == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}


def test_wrong_routing_settings_are_only_a_hint(exported, tmp_path):
    """A layer whose stored settings do not reproduce the graph's routing is rewritten with what the
    graph computes (found by value), and the plan says the record was wrong."""
    _, result = exported("vmoe-tiny")
    model = onnx.load(str(result.path))
    for p in model.metadata_props:
        if p.key == "moe_export.vmoe_layers":
            layers = json.loads(p.value)
            layers["blocks.3.mlp"]["capacity_factor"] = 0.25  # the graph was exported with 1.05
            p.value = json.dumps(layers)
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    out = tmp_path / "out.onnx"
    rewritten = rewrite_onnx(tampered, out)
    assert not rewritten.declined and rewritten.counts == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
    first, tampered_layer = rewritten.layers
    assert not first.notes and "are not what it computes" in tampered_layer.notes[0]
    source = from_zoo("vmoe-tiny")
    capacity = load(source).module.blocks[3].mlp.capacity(8 * source.config.tokens)
    routes = [_attrs(n) for n in _plugin_nodes(out) if n.op_type == "TopKRoute"]
    assert [r["capacity"] for r in routes] == [capacity, capacity]  # the graph's C = 1.05, not the record's 0.25
    assert validate_onnx(out, source).passed


def test_graph_without_routing_settings_is_rewritten_by_behaviour(exported, tmp_path):
    _, result = exported("vmoe-tiny")
    model = onnx.load(str(result.path))
    kept = [p for p in model.metadata_props if p.key != "moe_export.vmoe_layers"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    out = tmp_path / "out.onnx"
    rewritten = rewrite_onnx(old, out)
    assert not rewritten.declined and [layer.layer for layer in rewritten.layers] == ["blocks.1.mlp", "blocks.3.mlp"]
    assert rewritten.counts == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
    assert "k=2, groups of 8 images" in rewritten.layers[0].semantics
    assert validate_onnx(out, from_zoo("vmoe-tiny")).passed


def test_softmax_pair_that_is_not_soft_moe_is_declined(tmp_path):
    source = from_module(f"{FIXTURES}:double_softmax", input_shape=(2, 3, 16, 16))
    graph = tmp_path / "double.onnx"
    export_onnx(load(source), graph)
    out = tmp_path / "out.onnx"
    rewritten = rewrite_onnx(graph, out)
    assert rewritten.counts == {} and len(rewritten.declined) == 1
    assert "softmax-over-tokens" in rewritten.declined[0].reason
    assert not _plugin_nodes(out) and validate_onnx(out, source).passed


def test_rewriting_twice_or_a_missing_file_is_a_user_error(exported, tmp_path):
    _, result = exported("soft-moe-tiny", routing_outputs=False)
    out = tmp_path / "p.onnx"
    rewrite_onnx(result.path, out)
    with pytest.raises(UserError, match="already holds moe:: plugin nodes"):
        rewrite_onnx(out, tmp_path / "again.onnx")
    with pytest.raises(UserError, match="does not exist"):
        rewrite_onnx(tmp_path / "missing.onnx", out)


def test_external_weights_are_referenced_and_copied_beside_the_output(exported, tmp_path):
    source, result = exported("vmoe-tiny")
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    onnx.save(
        onnx.load(str(result.path)),
        str(src_dir / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=1024,
    )
    rewritten = rewrite_onnx(src_dir / "m.onnx", out_dir / "m.plugins.onnx")
    assert rewritten.counts["TopKRoute"] == 2
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.data", "m.plugins.onnx"]
    assert not [p for p in src_dir.iterdir() if p.name.startswith(".")]  # the probe cleaned up
    assert validate_onnx(out_dir / "m.plugins.onnx", source).passed


def test_external_weights_shared_when_the_output_is_beside_the_source(exported, tmp_path):
    source, result = exported("soft-moe-tiny", routing_outputs=False)
    onnx.save(onnx.load(str(result.path)), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data")
    rewrite_onnx(tmp_path / "m.onnx", tmp_path / "m.plugins.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx", "m.plugins.onnx"]
    assert validate_onnx(tmp_path / "m.plugins.onnx", source).passed


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_reduced_precision_graphs_rewrite_and_validate(exported, tmp_path, name, precision):
    """The FP16/BF16 graphs: every layer replaced (checked by value with the precision's tolerance),
    the plugins read FP32 router outputs and reduced tokens, and the result validates on CPU."""
    overrides = dict(capacity_factor=0.5, batch_priority=True) if name == "vmoe-tiny" else {}
    source, result = exported(name, precision=precision, **overrides)
    rewritten = rewrite_onnx(result.path, tmp_path / "plugins.onnx")
    assert not rewritten.declined and len(rewritten.layers) == len(load(source).moe_layers)
    model = onnx.load(str(tmp_path / "plugins.onnx"), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    reduced = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    for node in _plugin_nodes(tmp_path / "plugins.onnx"):
        if node.op_type in ("TopKRoute", "SoftRoute"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT
        else:  # dispatch and combine: the tokens in the reduced type, the router's weights in FP32
            assert types[node.input[0]] == reduced and types[node.output[0]] == reduced
    report = validate_onnx(tmp_path / "plugins.onnx", source, batch=16 if name == "vmoe-tiny" else 4)
    assert report.passed, report.to_json()
    assert report.precision == precision and all(r.unexplained == 0 for r in report.routing)


def test_a_graph_with_reduced_routing_is_not_rewritten(exported, tmp_path):
    _, result = exported("soft-moe-tiny", precision="fp16", routing_precision="reduced")
    with pytest.raises(UserError, match="route plugins take FP32 router outputs"):
        rewrite_onnx(result.path, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_quantized_graph_rewrites_with_its_qdq_around_the_experts_and_float_plugins(exported, tmp_path):
    """export --precision int8: the rewrite takes dequantized weights for weights and starts the experts
    before their QuantizeLinear, so the plugins read and write float tensors and the Q/DQ stay."""
    from exporter.parity.validate import validate_onnx

    _, result = exported("vmoe-tiny", precision="int8", capacity_factor=0.5, batch_priority=True)
    out = tmp_path / "plugins.onnx"
    rewritten = rewrite_onnx(result.path, out)
    assert rewritten.counts == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2} and not rewritten.declined
    before, model = onnx.load(str(result.path)), onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == [n.op_type for n in before.graph.node].count("QuantizeLinear")
    produced = {o: n for n in model.graph.node for o in n.output}

    def source(name):  # the node that made a tensor, through reshapes
        node = produced.get(name)
        while node is not None and node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze"):
            node = produced.get(node.input[0])
        return node

    plugins = [n for n in model.graph.node if n.domain == NAMESPACE]
    assert len(plugins) == 6
    assert not any(source(i) is not None and source(i).op_type == "DequantizeLinear" for n in plugins for i in n.input)
    quantized_dispatch = [
        n for n in model.graph.node if n.op_type == "QuantizeLinear" and (s := source(n.input[0])) is not None
        and s.op_type == "TopKDispatch"
    ]  # fmt: skip
    assert len(quantized_dispatch) == 2  # each layer's expert input: the dispatch plugin's float output, quantized
    report = validate_onnx(out)
    assert report.passed and all(r.unexplained == 0 for r in report.routing)
