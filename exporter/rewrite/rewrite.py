"""Portable ONNX -> plugin ONNX: each MoE layer's routing, dispatch and combine become ``moe::`` plugin nodes.

How a layer is found, and why it is safe to replace (``exporter.rewrite.rules``, one file per rule):

* **Top-k** layers (V-MoE, GShard, Switch, DeepSpeed, lucidrains, hand-written loops...) are found by
  behaviour, whoever wrote them: a router (a matmul to E logits, a softmax) feeding a top-k choice,
  inside the module (torch.onnx's scopes) that also holds the experts. moe-export's recorded settings
  are only tried first.
* **Soft-MoE** layers are found by op pattern, whoever wrote them: two softmaxes over one logits
  tensor (reshapes and transposes allowed between), each feeding a MatMul or Einsum (the slot mix and
  the token mix). Axis orders, ``[E, p, d]`` slot parameters, normalisation variants, hand-written
  softmaxes and ModuleList experts only change what sits around that pattern.
* Every candidate is then **checked by value**: the graph runs in ONNX Runtime on random images with
  the candidate tensors exposed (at two batches or more), and a layer is replaced only if the plugins'
  semantics reproduce those tensors (exactly for routing decisions, to 1e-4 of scale for floats).
  A layer that fails a check is reported with the reason and left as standard ONNX.

Each plugin node has ``op_type`` = plugin name, ``domain`` = ``plugin_namespace`` = ``moe`` and
``aot=1``, and a model-local function of the same name holding its standard-op decomposition, so ONNX
Runtime runs the result and TensorRT without the plugins still builds it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from exporter import settings
from exporter.errors import UserError
from exporter.fileio import atomic_dir, check_output, check_space
from exporter.formats.graph import (
    REWRITE_KEY,
    metadata,
    module_path,
    node_scopes,
    op_histogram,
    precision,
    read_header,
    vmoe_layers,
)
from exporter.progress import phase
from exporter.rewrite.graph import quiet_graphsurgeon
from exporter.rewrite.plan import Decline, LayerPlan, RewriteResult
from exporter.rewrite.probe import Probe
from exporter.rewrite.rules import GraphContext, rules
from exporter.settings import RoutingPrecision
from plugins import registry

log = logging.getLogger(__name__)


def plan_rewrite(
    path: str | Path, *, seed: int = settings.DEFAULT_SEED
) -> tuple[onnx.ModelProto, gs.Graph, list[LayerPlan]]:
    """Finds and checks every MoE layer of a portable graph; nothing is changed yet."""
    path = Path(path)
    proto = read_header(path)
    held = sorted({n.domain for n in proto.graph.node if registry.is_plugin_node(n)})
    if held:
        raise UserError(f"{path} already holds {held[0]}:: plugin nodes (it was rewritten before)")
    graph_precision, routing_precision = precision(proto)
    if routing_precision != RoutingPrecision.FP32:
        raise UserError(
            f"{path} computes its routing in {graph_precision}: the moe:: route plugins take FP32 router outputs; "
            "export with `routing_precision=fp32` (the default) to rewrite it"
        )
    with quiet_graphsurgeon():
        graph = gs.import_onnx(proto)
    paths = {name: module_path(scope) for name, scope in node_scopes(proto).items()}
    ctx = GraphContext(graph, paths, recorded=vmoe_layers(proto), precision=graph_precision)

    plans: list[LayerPlan] = []
    candidates = []
    for rule in rules():
        found, declined = rule.find(ctx)
        candidates += found
        plans += declined
    probe = Probe(path, proto, set().union(*(c.names() for c in candidates)), seed) if candidates else None
    rtol = settings.REWRITE_CHECK_RTOL[graph_precision]
    for candidate in candidates:
        try:
            plan, apply = candidate.check(probe, rtol)
            plan.apply = apply
        except Decline as e:
            plan = LayerPlan(candidate.layer, candidate.family, reason=str(e))
        plans.append(plan)
    first = {}  # layers in graph order
    for node in graph.nodes:
        for p in paths.get(node.name, []):
            first.setdefault(p, len(first))
    plans.sort(key=lambda plan: first.get(plan.layer, len(first)))
    return proto, graph, plans


def rewrite_onnx(
    src: str | Path,
    dest: str | Path | None,
    *,
    plan_only: bool = False,
    seed: int = settings.DEFAULT_SEED,
) -> RewriteResult:
    """Rewrites ``src`` into ``dest`` (atomically; checked with onnx.checker), or only plans it.

    Weights stored beside ``src`` as external data are referenced, not loaded: an output beside the
    source shares the weight file, one elsewhere gets a copy.
    """
    start = time.perf_counter()
    src = Path(src)
    if not (plan_only or dest is None):
        dest = check_output(dest)
        check_space(dest, sum(f.stat().st_size for f in src.parent.glob(src.name + "*")), f"rewriting {src.name}")
    with phase(log, "Finding and checking MoE layers (one ONNX Runtime run)"):
        proto, graph, plans = plan_rewrite(src, seed=seed)
    if not plans:
        raise UserError(f"{src} has no MoE layer to rewrite (no V-MoE or Soft-MoE layer found)")
    result = RewriteResult(src, None, plans, 0.0)
    if plan_only or dest is None:
        result.seconds = time.perf_counter() - start
        return result

    dest = Path(dest)
    with phase(log, "Replacing subgraphs with plugin nodes"):
        for plan in plans:
            if plan.replaced:
                plan.apply(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        graph.functions = []
        with quiet_graphsurgeon():
            out = gs.export_onnx(graph, do_type_check=False)
        out.functions.extend(plugin_functions(out))
        out.ir_version = max(proto.ir_version, 10)
        out.producer_name, out.producer_version = proto.producer_name, proto.producer_version
        del out.metadata_props[:]
        out.metadata_props.extend(proto.metadata_props)
        onnx.helper.set_model_props(out, {**metadata(proto), REWRITE_KEY: json.dumps(result.counts)})

    with phase(log, f"Writing and checking {dest.name}"), atomic_dir(dest) as tmp:
        path = tmp / dest.name
        external = _external_files(out)
        for location in sorted(external):  # weight files: shared when beside the source, else copied
            if (src.parent / location).resolve() != (dest.parent / location).resolve():
                shutil.copyfile(src.parent / location, tmp / location)
        onnx.save(out, str(path))
        try:  # with external weights, the graph is checked with them as inputs (they were not touched)
            onnx.checker.check_model(_weights_as_inputs(out) if external else str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise RuntimeError(f"the rewritten graph fails onnx.checker: {e}") from e
    result.path = dest
    result.op_counts = dict(sorted(op_histogram(out).items()))
    result.seconds = time.perf_counter() - start
    return result


def plugin_functions(model: onnx.ModelProto) -> list[onnx.FunctionProto]:
    """The local function of every registered plugin the graph uses, in registry order: the
    standard-op form ONNX Runtime runs and TensorRT falls back to."""
    used = {n.op_type for n in model.graph.node if registry.is_plugin_node(n)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return [registry.local_function(name, opset) for name in registry.specs() if name in used]


def _weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the (weightless) graph whose external initializers are graph inputs instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        copy.graph.initializer.remove(t)
    return copy


def _external_files(model: onnx.ModelProto) -> set[str]:
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files |= {e.value for e in t.external_data if e.key == "location"}
    return files
