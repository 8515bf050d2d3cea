"""TensorRT for RTX on this CPU-only machine: targets, the real parser and builder on the plugin and
portable graphs (the V3 plugins' types, shapes, attributes and serialisation run inside it), the
report, and the one-line refusals. Running an engine needs an RTX GPU (``rtx_gpu`` marker)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from exporter.backends.tensorrt import EngineOptions, plugin_nodes
from exporter.backends.tensorrt_rtx import (
    RTXUnavailable,
    build_engine,
    parse_graph,
    parse_targets,
    require_rtx,
    rtx_available,
)
from exporter.errors import CheckFailed, UserError
from exporter.rewrite.rewrite import rewrite_onnx

NO_RTX = rtx_available()
needs_rtx = pytest.mark.skipif(NO_RTX is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")


@pytest.mark.parametrize(
    "target, message",
    [
        ("sm_87", "cannot build for sm_87 (Jetson Orin: build with `backend=tensorrt`"),
        ("sm_90", "cannot build for sm_90 (Hopper (H100/H200): build with `backend=tensorrt`"),
        ("sm_110", "cannot build for sm_110 (Jetson Thor: build with `backend=tensorrt`"),
        ("sm_95", "its targets are sm_75, sm_80, sm_86, sm_89, sm_120, sm_121"),
        ("ampere", "is not a CUDA architecture"),
    ],
)
def test_targets_it_cannot_build_name_the_backend_that_can(target, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_targets([target])


def test_targets_parse_in_both_spellings_once_each():
    assert parse_targets(["sm_89", "120", "SM_89", "sm_120a"]) == [89, 120]
    with pytest.raises(UserError, match="give `target`"):
        parse_targets([])


@pytest.mark.skipif(NO_RTX is None, reason="checks the refusal where TensorRT for RTX is absent")
def test_without_tensorrt_rtx_one_line_with_the_install_command():
    with pytest.raises(RTXUnavailable, match="pip install tensorrt-rtx-cu12"):
        require_rtx("building the engine")


@pytest.fixture(scope="module")
def plugin_graphs(exported, tmp_path_factory):
    """Plugin graphs of both tiny models (V-MoE with Batch Prioritized Routing and dropped tokens)."""
    folder = tmp_path_factory.mktemp("rtx")
    out = {}
    for name, overrides in (("vmoe-tiny", dict(capacity_factor=0.5, batch_priority=True)), ("soft-moe-tiny", {})):
        _, result = exported(name, **overrides)
        rewrite_onnx(result.path, folder / f"{name}.plugins.onnx")
        out[name] = (result.path, folder / f"{name}.plugins.onnx")
    return out


def _kernels(engine: bytes) -> list[dict]:
    """The kernels the V3 plugins serialised into an engine (each a JSON object in a CHAR field)."""
    found = []
    for match in re.finditer(rb'\{"key": ', engine):
        text = engine[match.start() :].split(b"\0", 1)[0]
        found.append(json.JSONDecoder().raw_decode(text.decode("utf-8", "replace"))[0])
    return found


@needs_rtx
@pytest.mark.parametrize("name, group", [("vmoe-tiny", 8), ("soft-moe-tiny", 1)])
def test_plugin_graph_builds_with_a_plugin_layer_and_kernel_per_node(plugin_graphs, name, group, tmp_path, caplog):
    _, graph = plugin_graphs[name]
    engine = tmp_path / "e.engine"
    options = EngineOptions(max_batch=2 * group)  # a profile over one and two groups: the batch axis is dynamic
    with caplog.at_level(logging.INFO, logger="exporter"):
        build = build_engine(graph, engine, "sm_89", options, batch_multiple=group)
    progress = [r.getMessage() for r in caplog.records]
    assert build.plugin_layers == build.expected_plugins == plugin_nodes(graph)
    assert sum(build.plugin_layers.values()) == 6 and build.target == "sm_89" and build.fp32_layers is None
    assert build.size_bytes == engine.stat().st_size > 0 and any("Building engine" in p for p in progress)
    assert build.batch == {"min": group, "opt": 2 * group, "max": 2 * group}
    # the plugins' configure_plugin compiled each node's kernel for the target and serialised it
    kernels = _kernels(engine.read_bytes())
    assert len(kernels) >= 6 and all(k["arch"] == 89 and ".target sm_89" in k["ptx"] for k in kernels)
    assert all(f".entry {k['name']}(" in k["ptx"] for k in kernels)
    if name == "vmoe-tiny":  # the node's attributes reached the kernel: k = 2, Batch Prioritized Routing
        route = [k for k in kernels if k["key"].startswith("topk_route_kernel")]
        assert route and all("K=2" in k["key"] and "BPR=1" in k["key"] for k in route)
        assert all(k["dynamic"][0] == [0] for k in route)  # the groups axis is the dynamic one


@needs_rtx
def test_reduced_precision_plugin_graph_reports_its_fp32_layers(exported, tmp_path):
    _, result = exported("soft-moe-tiny", precision="bf16")
    graph = rewrite_onnx(result.path, tmp_path / "bf16.plugins.onnx").path
    build = build_engine(graph, tmp_path / "e.engine", 89)
    assert build.precision == "bf16" and build.fp32_layers > 0 and build.plugin_layers == plugin_nodes(graph)
    kernels = _kernels((tmp_path / "e.engine").read_bytes())
    tokens = [k for k in kernels if not k["key"].startswith("soft_route")]
    assert tokens and all("*bf16" in k["key"] for k in tokens)  # the token kernels in the graph's type


@needs_rtx
def test_portable_graph_builds_without_plugins(plugin_graphs, tmp_path):
    portable, _ = plugin_graphs["vmoe-tiny"]
    build = build_engine(portable, tmp_path / "p.engine", "sm_120", batch_multiple=8)
    assert build.plugin_layers == {} and build.expected_plugins == {} and build.target == "sm_120"


@needs_rtx
def test_a_profile_that_splits_a_routing_group_is_refused(plugin_graphs, tmp_path):
    portable, _ = plugin_graphs["vmoe-tiny"]
    with pytest.raises(UserError, match="multiples of the routing group"):
        build_engine(portable, tmp_path / "p.engine", 89, EngineOptions(min_batch=4), batch_multiple=8)
    with pytest.raises(UserError, match="no timing cache"):
        build_engine(portable, tmp_path / "p.engine", 89, EngineOptions(timing_cache=str(tmp_path / "c")))
    assert not (tmp_path / "p.engine").exists()


@needs_rtx
def test_a_graph_too_big_for_this_machine_is_refused_before_building(plugin_graphs, tmp_path, monkeypatch):
    from exporter.backends import tensorrt_rtx

    portable, _ = plugin_graphs["vmoe-tiny"]
    monkeypatch.setattr(tensorrt_rtx, "available_memory", lambda: 2**20)
    with pytest.raises(UserError, match="too big to build here: the build needs about"):
        build_engine(portable, tmp_path / "p.engine", 89, batch_multiple=8)


@needs_rtx
def test_a_plugin_graph_without_its_plugins_is_refused(plugin_graphs, tmp_path):
    """A plugin node whose attribute is missing cannot become its plugin: the build fails, naming it."""
    import onnx

    _, graph = plugin_graphs["soft-moe-tiny"]
    model = onnx.load(graph)
    node = next(n for n in model.graph.node if n.op_type == "SoftDispatch")
    kept = [a for a in node.attribute if a.name != "num_experts"]
    del node.attribute[:]
    node.attribute.extend(kept)
    broken = tmp_path / "broken.onnx"
    onnx.save(model, broken)
    with pytest.raises(CheckFailed, match="TensorRT for RTX could not (parse|build)"):
        build_engine(broken, tmp_path / "b.engine", 89)


@needs_rtx
def test_the_parser_reports_a_graph_it_refuses(tmp_path):
    import onnx

    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 18]> g (float[4] x) => (float[N] y) { y = Unique(x) }'
    )
    report = parse_graph(model)
    assert not report.parsed and report.errors[0]["op"] == "Unique"


@pytest.mark.rtx_gpu
def test_plugin_engine_runs_and_matches_pytorch_on_an_rtx_gpu(plugin_graphs, tmp_path):
    """The V3 plugins' enqueue: the precompiled PTX launched through cuda-python, routing included."""
    from exporter.backends.tensorrt_rtx import gpu_arch
    from exporter.deploy.engines import build_rtx_engines

    for name, (_, graph) in plugin_graphs.items():
        built = build_rtx_engines(
            graph, tmp_path / name, [f"sm_{gpu_arch()}"], batch_multiple=8 if "vmoe" in name else 1
        )
        ((target, report),) = built.parity.items()
        assert report.passed and built.builds[0].ran, (name, report.to_dict())
        if name == "vmoe-tiny":
            assert all(r.decisions == 1.0 for r in report.routing)
