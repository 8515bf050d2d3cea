"""TensorRT engines. On CPU: the one-line refusal without TensorRT, option checks, the batch profile,
and the graph facts the build relies on (plugin nodes, the graph's own precision). With TensorRT
and a GPU (``gpu`` marker): bundle engines built, inspected and validated, FP32 and reduced precision,
portable and plugin graphs, and the Triton Inference Server entry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from exporter import settings
from exporter.backends.tensorrt import (
    EngineOptions,
    TensorRTUnavailable,
    build_engine,
    plugin_nodes,
    profile_batch,
    require_tensorrt,
    tensorrt_available,
)
from exporter.errors import UserError
from exporter.rewrite.rewrite import rewrite_onnx

no_tensorrt = pytest.mark.skipif(tensorrt_available() is None, reason="TensorRT and a GPU are present here")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Portable and plugin graphs of both tiny models."""
    from exporter.export.export import export_onnx
    from exporter.sources.loading import from_zoo, load

    folder = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, overrides in (("vmoe-tiny", dict(capacity_factor=0.5, batch_priority=True)), ("soft-moe-tiny", {})):
        portable, plugins = folder / f"{name}.onnx", folder / f"{name}.plugins.onnx"
        export_onnx(load(from_zoo(name, **overrides)), portable, routing_outputs=True)
        rewrite_onnx(portable, plugins)
        out[name] = (portable, plugins)
    return out


@no_tensorrt
def test_without_tensorrt_one_reason_and_nothing_written(graphs, tmp_path):
    reason = tensorrt_available()
    assert reason and "\n" not in reason
    with pytest.raises(TensorRTUnavailable, match="needs TensorRT and a GPU") as info:
        require_tensorrt("building an engine")
    assert info.value.exit_code == 2 and "pip install tensorrt" in str(info.value) and reason in str(info.value)
    with pytest.raises(TensorRTUnavailable):
        build_engine(graphs["vmoe-tiny"][1], tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, match",
    [
        (EngineOptions(precision="int3"), "'int3' is not one of fp32, fp16, bf16, int8"),
        (EngineOptions(min_batch=16, max_batch=8), "min batch <= opt batch <= max batch"),
        (EngineOptions(min_batch=0), ">= 1"),
        (EngineOptions(opt_level=7), "0-5"),
    ],
)
def test_bad_options_are_usage_errors(options, match):
    with pytest.raises(UserError, match=match):
        options.check()


def test_batch_profile_in_routing_groups():
    assert profile_batch(None, EngineOptions(), 8) == {"min": 8, "opt": 8, "max": 8}
    assert profile_batch(None, EngineOptions(max_batch=32), 8) == {"min": 8, "opt": 32, "max": 32}
    assert profile_batch(None, EngineOptions(min_batch=2, opt_batch=4, max_batch=16)) == {
        "min": 2,
        "opt": 4,
        "max": 16,
    }
    assert profile_batch(4, EngineOptions()) == {"min": 4, "opt": 4, "max": 4}
    with pytest.raises(UserError, match="multiples of the routing group"):
        profile_batch(None, EngineOptions(max_batch=12), 8)
    with pytest.raises(UserError, match="fixed at 4"):
        profile_batch(4, EngineOptions(max_batch=8))


def test_plugin_nodes_counts_each_plugin(graphs):
    assert plugin_nodes(graphs["vmoe-tiny"][0]) == {}
    assert plugin_nodes(graphs["vmoe-tiny"][1]) == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
    assert plugin_nodes(graphs["soft-moe-tiny"][1]) == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}


@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_the_build_takes_the_graphs_own_precision(graphs, name, tmp_path):
    """Strongly typed: the precision is the graph's; asking for another is refused before TensorRT is
    looked for, naming the export option that makes it."""
    from exporter.backends.tensorrt import graph_precision
    from exporter.deploy.engines import build_onnx_engine

    portable, plugins = graphs[name]
    assert graph_precision(portable) == graph_precision(plugins) == ("fp32", "fp32")
    assert graph_precision(portable, "fp32") == ("fp32", "fp32")
    with pytest.raises(UserError, match="is typed fp32 and TensorRT builds it strongly typed.* `precision=fp16`"):
        graph_precision(plugins, "fp16")
    with pytest.raises(UserError, match="`precision=bf16`"):
        build_onnx_engine(plugins, tmp_path, EngineOptions(precision="bf16"))


# --- with TensorRT and a GPU ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_bundles(tmp_path_factory):
    from exporter.deploy.bundle import build_bundle
    from exporter.sources.loading import from_zoo

    folder = tmp_path_factory.mktemp("engine-bundles")
    return {
        name: build_bundle(from_zoo(name, **overrides), folder / name, targets=[90]).path
        for name, overrides in (("vmoe-tiny", dict(capacity_factor=0.5, batch_priority=True)), ("soft-moe-tiny", {}))
    }


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_bundle_engine_has_its_plugin_layers_and_matches_pytorch(built_bundles, name):
    from exporter.deploy.engines import build_bundle_engine
    from exporter.fileio import sha256
    from exporter.formats.bundle import ENGINE, read_manifest

    bundle = built_bundles[name]
    built = build_bundle_engine(bundle, EngineOptions(max_batch=16 if name == "vmoe-tiny" else 8))
    assert built.build.plugin_layers == built.build.expected_plugins and sum(built.build.plugin_layers.values()) == 6
    assert built.passed, built.parity.to_dict()
    assert all(r.decisions == 1.0 for r in built.parity.routing)
    if name == "vmoe-tiny":
        assert built.parity.routing and all(r.dropped_expected > 0 for r in built.parity.routing)
    manifest = read_manifest(bundle)
    assert manifest["engine"]["precision"] == "fp32" and manifest["engine"]["parity"]["passed"]
    assert manifest["files"][ENGINE]["sha256"] == sha256(bundle / ENGINE)


@pytest.mark.gpu
def test_portable_engine_and_validate_cli(built_bundles, tmp_path):
    from exporter.deploy.engines import build_bundle_engine
    from tests.helpers import run

    bundle = built_bundles["vmoe-tiny"]
    built = build_bundle_engine(bundle, EngineOptions(), portable=True)
    assert built.passed and built.build.plugin_layers == {} and built.build.expected_plugins == {}
    result = run("validate", bundle, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "tensorrt" and report["passed"] and len(report["routing"]) == 2


@pytest.fixture(scope="module")
def reduced_bundles(tmp_path_factory):
    from exporter.deploy.bundle import build_bundle
    from exporter.sources.loading import from_zoo

    folder = tmp_path_factory.mktemp("reduced-bundles")
    source = from_zoo("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    return {p: build_bundle(source, folder / p, targets=[90], precision=p).path for p in ("fp16", "bf16")}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_bundle_builds_strongly_typed(reduced_bundles, precision):
    """The FP16/BF16 bundle's plugin graph builds as it is typed (no precision flags), keeps every
    plugin layer, and matches PyTorch within the precision's tolerances with every flip explained."""
    from exporter.deploy.engines import build_bundle_engine
    from exporter.formats.bundle import read_manifest

    bundle = reduced_bundles[precision]
    built = build_bundle_engine(bundle, EngineOptions(max_batch=16))
    assert built.build.precision == precision and sum(built.build.plugin_layers.values()) == 6
    assert built.parity.tolerances == dataclasses.asdict(settings.TOLERANCES[precision])
    assert built.passed, built.parity.to_dict()
    assert all(r.unexplained == 0 for r in built.parity.routing)
    assert read_manifest(bundle)["engine"]["precision"] == precision
    with pytest.raises(UserError, match=f"is typed {precision}"):
        build_bundle_engine(bundle, EngineOptions(precision="fp32"))


@pytest.mark.gpu
def test_triton_entry_for_a_built_engine(built_bundles, tmp_path):
    from exporter.deploy.engines import build_bundle_engine, triton_entry

    bundle = built_bundles["soft-moe-tiny"]
    build_bundle_engine(bundle, EngineOptions(max_batch=8))
    entry = triton_entry(bundle, tmp_path / "repo")
    assert entry.complete and entry.dynamic_batching and entry.max_batch_size == 8
    assert (entry.path / "1" / "model.plan").read_bytes() == (bundle / "model.engine").read_bytes()


def test_plugin_layers_are_counted_from_the_inspector_json(graphs):
    """The engine inspector's JSON (detailed verbosity) lists layers with Name and LayerType; a plugin
    node that became a plugin layer is counted, one inlined into standard layers (the local-function
    fallback) is not."""
    from exporter.backends.tensorrt import count_plugin_layers, plugin_node_names

    nodes = plugin_node_names(graphs["vmoe-tiny"][1])
    assert sorted(nodes.values()) == sorted(["TopKRoute", "TopKDispatch", "TopKCombine"] * 2)
    plugin_layers = [{"Name": name, "LayerType": "PluginV3", "Inputs": []} for name in nodes]
    others = [{"Name": "node_MatMul_3 + node_Add_4", "LayerType": "CaskGemmMatrixMultiply"}]
    assert count_plugin_layers({"Layers": plugin_layers + others}, nodes) == (
        7,
        {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2},
    )
    inlined = [{"Name": f"{name}/ArgMax_0", "LayerType": "Reduce"} for name in nodes]
    assert count_plugin_layers({"Layers": inlined + others}, nodes) == (7, {})
    assert count_plugin_layers({"Layers": ["a", "b"]}, nodes) == (2, {})  # names only: nothing proven
    names_only = list(nodes) + ["node_MatMul_3"]  # the other known form: one name string per layer
    assert count_plugin_layers({"Layers": names_only}, nodes)[1] == {
        "TopKRoute": 2,
        "TopKDispatch": 2,
        "TopKCombine": 2,
    }
    assert count_plugin_layers({"Layers": [f"{n}/ArgMax_0" for n in nodes]}, nodes)[1] == {}


def test_numpy_and_tensorrt_versions_that_cannot_create_plugins():
    from exporter.backends.tensorrt import numpy_plugin_conflict

    for trt_v, np_v in (("10.9.0.34", "2.4.0"), ("11.1.0", "2.5.2"), ("10.16.1", "2.4")):
        message = numpy_plugin_conflict(trt_v, np_v)
        assert message and "numpy<2.4" in message and "11.2" in message and trt_v in message
    for trt_v, np_v in (("10.9.0", "2.3.5"), ("11.2.0", "2.5.0"), ("10.3.0", "2.5.0"), ("12.0", "3.0")):
        assert numpy_plugin_conflict(trt_v, np_v) is None


@pytest.mark.gpu
def test_plugin_engines_of_other_shapes_in_one_process(built_bundles, tmp_path):
    """Settles the TensorRT 10.9-10.14 question of a shape-expression builder kept between shape
    callbacks: a second plugin engine, of other shapes (the other family, a larger batch profile),
    built in the same process after the first, must build and match PyTorch too."""
    from exporter.deploy.engines import build_bundle_engine

    first = build_bundle_engine(built_bundles["soft-moe-tiny"], EngineOptions(max_batch=4))
    second = build_bundle_engine(built_bundles["vmoe-tiny"], EngineOptions(max_batch=32))
    third = build_bundle_engine(built_bundles["soft-moe-tiny"], EngineOptions(max_batch=16))
    assert first.passed and second.passed and third.passed


@pytest.mark.gpu
def test_inspector_and_network_agree_on_plugin_layers(graphs, tmp_path):
    """Settles how an AOT plugin layer appears in the engine inspector's JSON: the build's pass
    criterion counts the parsed network's plugin layers; the inspector must see the same ones."""
    from exporter.backends.tensorrt import build_engine

    portable, plugins = graphs["vmoe-tiny"]
    built = build_engine(plugins, tmp_path / "v.engine", EngineOptions(), batch_multiple=8)
    assert built.plugin_layers == built.expected_plugins == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
    assert not any("inspector" in note for note in built.notes), built.notes
