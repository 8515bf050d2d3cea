"""Routing-aware parity: PyTorch's answer on one batch (``Reference``), and a backend's outputs
compared with it (``compare_to_reference``): outputs within tolerance, and per V-MoE layer the same
expert and kept/dropped decision for every (token, choice), buffer slots compared and reported
(``exporter.compare`` says why a slot swap alone does not fail).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporter import settings
from exporter.backends.runner import Runner
from exporter.backends.torch import TorchRunner, rounding_as
from exporter.compare import (
    OutputParity,
    RoundingParity,
    RoutingArrays,
    RoutingParity,
    SoftRoutingParity,
    compare_output,
    compare_routing,
    compare_soft_routing,
    explain_flips,
    image_errors,
)
from exporter.errors import UserError, one_line
from exporter.formats.arrays import check_finite, load_npz
from exporter.formats.bundle import read_stored_outputs
from exporter.formats.graph import (
    ROUTING_PREFIX,
    SOURCE_KEY,
    bfloat16_roundings,
    image_input,
    input_dims,
    metadata,
    plugin_routes,
    precision,
    router_tensors,
    routing_layers,
    routing_output_names,
    vmoe_layers,
)
from exporter.progress import phase
from exporter.settings import Precision, RoutingPrecision
from exporter.sources.loading import LoadedModel, ModelSource, check_batch, load

log = logging.getLogger(__name__)

ROUTING_CHECKED, ROUTING_NOT_EXPOSED, ROUTING_NONE = "checked", "not exposed by the graph", "no V-MoE layers"


@dataclass
class ParityReport:
    model: str
    graph: str
    backend: str
    batch: int
    seed: int | None
    tolerances: dict
    outputs: list[OutputParity]
    routing: list[RoutingParity]
    routing_status: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    precision: Precision = Precision.FP32  # of the graph (or engine)
    routing_precision: RoutingPrecision = RoutingPrecision.FP32  # pinned, or reduced
    soft_routing: list[SoftRoutingParity] = field(default_factory=list)
    rounding: RoundingParity | None = None  # bf16 dispatch: the graph's roundings, when they decided

    @property
    def passed(self) -> bool:
        rounding_ok = self.rounding is None or self.rounding.passed
        return all(o.passed for o in self.outputs) and all(r.passed for r in self.routing) and rounding_ok

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def worst(self) -> str:
        """What failed, in one line: the output furthest beyond the tolerance, else the V-MoE layer with the
        fewest agreeing decisions (or flips its gates do not explain), else the bfloat16 roundings."""
        rtol, agreement = self.tolerances["rtol"], self.tolerances["routing_agreement"]
        if failed := [o for o in self.outputs if not o.passed]:
            o = max(failed, key=lambda o: o.max_rel)
            return f"{o.name} max rel err {o.max_rel:.3g} (tolerance {rtol:g})"
        if failed := [r for r in self.routing if not r.passed]:
            r = min(failed, key=lambda r: (r.decisions, -r.unexplained))
            if r.unexplained:
                return f"{r.layer}: {r.unexplained} flipped routing decisions its gates do not explain"
            return f"{r.layer}: routing decisions {math.floor(r.decisions * 1e4) / 1e2:.2f}% (at least {agreement:.2%})"
        if self.rounding is not None and not self.rounding.passed:
            return f"{self.rounding.unexplained} elements rounded to bfloat16 unlike PyTorch, not at a midpoint"
        return "passed"

    def summary(self) -> dict:
        """The few numbers a bundle manifest records."""
        return {
            "passed": self.passed,
            "backend": self.backend,
            "batch": self.batch,
            "max_rel_err": max((o.max_rel for o in self.outputs), default=0.0),
            "routing": self.routing_status,
            "routing_decisions": min((r.decisions for r in self.routing), default=None),
            "slot_swaps": sum(r.slot_swaps for r in self.routing),
            "precision": self.precision,
            "routing_flips": sum(r.flip_count for r in self.routing),
            "bf16_rounded_at_midpoint": self.rounding.at_midpoint if self.rounding else 0,
        }


def recorded_source(graph_path: str | Path, header: onnx.ModelProto, *, trust_module: bool = False) -> ModelSource:
    """The model a graph records it was exported from, every value checked as data. A recorded user
    module is code: it is refused unless ``trust_module`` (the CLI's ``--trust-module``), with one line
    saying what the graph records and how to run it; reading a graph never runs the code it names."""
    text = metadata(header).get(SOURCE_KEY)
    if text is None:
        raise UserError(
            f"{graph_path} does not say which model it was exported from; name the model (`model` or `module`)"
        )
    source = ModelSource.from_json(text, f"{graph_path}'s metadata {SOURCE_KEY}").anchored(Path(graph_path).parent)
    if source.kind == "module" and not trust_module:
        shape = ",".join(map(str, source.input_shape))
        weights = f" `checkpoint={source.checkpoint}`" if source.checkpoint else ""
        raise UserError(
            f"{graph_path} records the user module {source.spec}, which moe-export does not import on a graph's "
            f"word (that would run its code): name it, `module={source.spec}` `input_shape={shape}`{weights}, or "
            "pass `trust_module` if you trust the graph and that file"
        )
    return source


def make_inputs(
    header, loaded: LoadedModel, *, batch: int | None, seed: int, inputs_npz: str | None
) -> tuple[str, np.ndarray]:
    value = image_input(header)
    name = value.name
    dims = [d if isinstance(d, int) else None for d in input_dims(value)]
    if inputs_npz:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        array = np.ascontiguousarray(read_inputs(inputs_npz, name, dtype))
    else:
        batch = batch or settings.default_batch(loaded.batch_multiple)
        check_batch(batch, loaded)  # before allocating: the batch is bounded
        array = np.random.default_rng(seed).standard_normal((batch, *loaded.source.input_shape), dtype=np.float32)
    fits = len(dims) == array.ndim and all(d in (None, 0, s) for d, s in zip(dims, array.shape))
    if not fits:
        want = "x".join("N" if d in (None, 0) else str(d) for d in dims)
        raise UserError(f"input shape {'x'.join(map(str, array.shape))} does not match the graph's {name} ({want})")
    check_batch(array.shape[0], loaded)
    return name, array


def read_inputs(path: str | Path, name: str, dtype: np.dtype) -> np.ndarray:
    """The graph input ``name`` from a .npz (``np.savez(path, images=array)``) or Polygraphy's JSON
    (``polygraphy run --save-inputs``, a bundle's ``inputs.json``; one iteration). It must hold that
    one array, with the graph's dtype; anything else is refused with one line."""
    path = Path(path)
    # an .npz's sizes are checked from its headers before anything is inflated
    arrays = _polygraphy_inputs(path) if path.suffix == ".json" else load_npz(path, what="inputs")
    if name not in arrays:
        raise UserError(f"{path} holds {sorted(arrays)}, none named {name!r} (the graph's input)")
    if extra := sorted(set(arrays) - {name}):
        raise UserError(f"{path} holds arrays the graph does not take: {', '.join(extra)} (its one input is {name!r})")
    array = arrays[name]
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise UserError(f"{path}: {name!r} is {got}; the graph takes {np.dtype(dtype)} (convert it with .astype)")
    check_finite(array, name, path)
    return array


def _polygraphy_inputs(path: Path) -> dict:
    """The one iteration of a Polygraphy input-data JSON file, as {name: array}."""
    from polygraphy.exception import PolygraphyException
    from polygraphy.json import load_json

    from exporter.backends.tensorrt import quiet_polygraphy

    if path.is_file() and path.stat().st_size > 2 * settings.MAX_INPUT_BYTES:  # base64 and JSON around the data
        raise UserError(f"{path} holds {path.stat().st_size:,} bytes, more than inputs within the limit can")
    try:
        with quiet_polygraphy("CRITICAL"):
            iterations = load_json(str(path), description="input data")
    except (OSError, ValueError, TypeError, KeyError, PolygraphyException) as e:
        raise UserError(f"cannot read inputs from {path}: {one_line(e)}") from None
    if isinstance(iterations, dict):
        iterations = [iterations]
    if not isinstance(iterations, list) or len(iterations) != 1 or not isinstance(iterations[0], dict):
        count = len(iterations) if isinstance(iterations, list) else "no"
        raise UserError(f"{path} holds {count} iterations of Polygraphy input data; give one")
    return dict(iterations[0])


@dataclass
class Reference:
    """PyTorch's answer on one input batch: what every backend is compared against."""

    model: str
    input_name: str
    images: np.ndarray
    outputs: list[np.ndarray]  # the model's flat outputs, in order
    routing: dict[str, RoutingArrays]
    seed: int | None  # None when the images came from a file
    stored: str | None = None  # where stored outputs came from, when PyTorch did not run now
    routers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # router outputs per MoE layer
    source: ModelSource | None = None  # the model that ran, to run again (None: stored outputs)
    # layers of other authors whose routing is PyTorch's router probabilities routed by the semantics the
    # rewrite found (``route_as_plugin``): compared where a graph has their TopKRoute node
    derived: frozenset[str] = frozenset()

    def named_outputs(self, header: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The outputs under the graph's output names, routing outputs included (as the graph types them)."""
        names = [o.name for o in header.graph.output]
        plain = [n for n in names if not n.startswith(ROUTING_PREFIX)]
        named = dict(zip(plain, self.outputs))
        for layer, r in self.routing.items():
            expert, kept, slot = routing_output_names(layer)
            named.update({expert: r.expert.astype(np.int32), kept: r.slot >= 0, slot: r.slot.astype(np.int32)})
        return {n: named[n] for n in names if n in named}


def reference_run(
    source: ModelSource,
    header: onnx.ModelProto,
    *,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    loaded: LoadedModel | None = None,
) -> Reference:
    """Builds the PyTorch model (unless ``loaded`` is given) and runs it on seeded random images (or
    ``inputs_npz``) shaped for the graph."""
    if loaded is None:
        with phase(log, f"Building {source.name} in PyTorch"):
            loaded = load(source)
    name, images = make_inputs(header, loaded, batch=batch, seed=seed, inputs_npz=inputs_npz)
    routes = plugin_routes(header)
    with phase(log, f"Running PyTorch on {images.shape[0]} images"):
        expected, routing, routers = _torch_run(loaded.module, images, routes)
    del loaded  # big models: free this reference to PyTorch's weights before another runtime loads its own
    gc.collect()
    seed = None if inputs_npz else seed
    derived = frozenset(layer for layer, r in routing.items() if isinstance(r, DerivedRouting))
    return Reference(
        source.name, name, images, expected, routing, seed, routers=routers, source=source, derived=derived
    )


def _torch_run(
    module, images: np.ndarray, routes: dict[str, dict] | None = None
) -> tuple[list[np.ndarray], dict[str, RoutingArrays], dict]:
    """PyTorch's outputs, routing and router outputs on the images (a ``TorchRunner``). ``routes``: the
    graph's TopKRoute nodes (``plugin_routes``); for each layer that moe-export did not write, PyTorch's
    own router probabilities routed by the node's semantics are its routing."""
    wanted = {layer: r["experts"] for layer, r in (routes or {}).items() if r["experts"]}
    with TorchRunner(module, probabilities=wanted) as runner:
        expected = list(runner.infer({"images": images}).values())
    routing = {layer: RoutingArrays(r.expert.numpy(), r.slot.numpy()) for layer, r in runner.routing.items()}
    routers = dict(runner.routers)
    for layer, probabilities in runner.probabilities.items():
        if layer not in routing:
            derived, gates = route_as_plugin(probabilities, routes[layer])
            routing[layer] = DerivedRouting(derived.expert, derived.slot)
            routers[layer] = {"gates": gates}
    return expected, routing, routers


class DerivedRouting(RoutingArrays):
    """The routing of a layer moe-export did not write: its router probabilities routed by the semantics
    the rewrite found (a graph without the layer's TopKRoute node has nothing to compare it with)."""


def route_as_plugin(probabilities: np.ndarray, route: dict) -> tuple[RoutingArrays, np.ndarray]:
    """The routing a ``TopKRoute`` node (``plugin_routes``) gives router probabilities ``[..., E]``, as
    PyTorch computed them: the node's semantics, exactly (``exporter.models.routing.route_top_k``)."""
    import torch

    from exporter.models.routing import route_top_k
    from plugins.topk_route.capacity import capacity

    experts = probabilities.shape[-1]
    tokens = probabilities.size // experts
    per_group = route["group_tokens"] or tokens
    gates = probabilities.reshape(tokens // per_group, per_group, experts).astype(np.float32)
    a = route["attrs"]
    r = route_top_k(
        torch.from_numpy(gates),
        int(a["k"]),
        capacity(per_group, a),
        bool(a["batch_priority"]),
        by_token=bool(a.get("by_token", 0)),
        normalize=int(a.get("normalize", 0)),
        eps=float(a.get("eps", 0.0)),
    )
    return RoutingArrays(r.expert.numpy(), r.slot.numpy()), gates


def plugin_routing(route: dict, expert: np.ndarray, slot: np.ndarray) -> dict[str, np.ndarray]:
    """A ``TopKRoute`` node's outputs as the routing outputs moe-export's graphs have
    (``routing_output_names``): the expert, kept, and the buffer position (the flat slot ``e*C + c``
    less ``e*C``; -1 dropped)."""
    from plugins.topk_route.capacity import capacity

    c = capacity(expert.shape[1], route["attrs"])
    kept = slot >= 0
    return {"expert": expert, "kept": kept, "slot": np.where(kept, slot - expert * c, -1).astype(np.int32)}


def onnxruntime_runner(path: str | Path, header: onnx.ModelProto):
    """An ONNX Runtime (CPU) runner of a graph that also returns its internal tensors: the router
    tensors (``router_tensors``, for ``compare_to_reference(routers=...)``) and the bfloat16 roundings
    of bf16 dispatch (``bfloat16_roundings``). BF16 graphs, and FP16 graphs whose routing is FP16, run
    emulated (``exporter.backends.emulation.emulation_type``)."""
    from exporter.backends.onnxruntime import OnnxRuntimeRunner

    names = [o.name for o in header.graph.output]
    routers = {n for layer in router_tensors(header).values() for n in layer.values()}
    routes = {n for r in plugin_routes(header).values() for n in (r["expert"], r["slot"])}
    internals = sorted(routers | routes | set(bfloat16_roundings(header)))
    outputs = names + [n for n in internals if n not in names]
    return OnnxRuntimeRunner(Path(path), header=header, outputs=outputs, name=ort_backend_name(header))


def onnxruntime_outputs(
    path: str | Path, header: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(outputs, internal tensors) of one ONNX Runtime (CPU) run of a graph (``onnxruntime_runner``)."""
    names = [o.name for o in header.graph.output]
    with onnxruntime_runner(path, header) as runner:
        values = runner.infer(feeds)
    return {n: values[n] for n in names}, {n: v for n, v in values.items() if n not in names}


def compare_runner(
    reference: Reference,
    runner: Runner,
    header: onnx.ModelProto,
    *,
    graph: str,
    tolerances: settings.Tolerances = settings.FP32_TOLERANCES,
    start: float | None = None,
) -> ParityReport:
    """The one comparison loop (validate, the bundle, the engines): runs any runner
    (``exporter.backends.runner``) on the reference's images and compares its outputs, in the graph's
    output order, with PyTorch's (``compare_to_reference``); the other tensors it returns are the
    graph's router tensors, whose flips and weights are then explained."""
    names = [o.name for o in header.graph.output]
    with phase(log, f"Running {runner.name} on {reference.images.shape[0]} images"), runner:
        values = runner.infer({reference.input_name: reference.images})
    actual = {n: values[n] for n in names if n in values}
    routers = {n: v for n, v in values.items() if n not in names}
    return compare_to_reference(
        reference,
        actual,
        header,
        graph=graph,
        backend=runner.name,
        tolerances=tolerances,
        start=start,
        routers=routers or None,
    )


def ort_backend_name(header: onnx.ModelProto) -> str:
    from exporter.backends.emulation import emulation_type

    dtype = emulation_type(header)
    names = {"BFLOAT16": Precision.BF16, "FLOAT16": Precision.FP16, "FLOAT8E4M3FN": Precision.FP8}
    return "onnxruntime-cpu" + ("" if dtype is None else f" ({names[dtype.name]} emulated)")


def stored_reference(bundle: str | Path) -> Reference:
    """PyTorch's outputs and routing on a bundle's sample inputs, as the bundle stores them (hashes
    checked): validation on the target needs neither the model's code nor its checkpoint."""
    stored = read_stored_outputs(bundle)
    return Reference(
        model=stored["model"],
        input_name=stored["input_name"],
        images=stored["images"],
        outputs=stored["outputs"],
        routing={layer: RoutingArrays(*arrays) for layer, arrays in stored["routing"].items()},
        seed=stored["seed"],
        stored=f"PyTorch outputs stored in {Path(bundle).name} when it was built ({stored['created']})",
    )


def compare_to_reference(
    reference: Reference,
    actual: dict[str, np.ndarray],
    header: onnx.ModelProto,
    *,
    graph: str,
    backend: str,
    tolerances: settings.Tolerances = settings.FP32_TOLERANCES,
    start: float | None = None,
    routers: dict[str, np.ndarray] | None = None,
) -> ParityReport:
    """Outputs within tolerance and, for every V-MoE layer the graph exposes, the same routing decisions.

    ``routers`` holds the backend's values of the graph's router tensors (``router_tensors``): with the
    reference's, every flipped V-MoE decision is listed and explained, and each Soft-MoE layer's
    dispatch and combine weights are compared."""
    expected, source = reference.outputs, reference.model
    plain = [n for n in actual if not n.startswith(ROUTING_PREFIX)]
    _check_comparable(plain, expected, actual, source)
    outputs = [compare_output(n, e, actual[n], tolerances.rtol) for n, e in zip(plain, expected)]
    actual, recorded = _with_plugin_routing(actual, header, reference.routing, routers)
    routing, status, checked, notes = _compare_routing(reference, actual, recorded, tolerances)
    soft: list[SoftRoutingParity] = []
    if routers:
        errors = image_errors(expected[0], actual[plain[0]]) if expected else None
        soft = _compare_routers(reference, header, routing, checked, actual, routers, errors)
    graph_precision, routing_precision = precision(header)
    return ParityReport(
        model=source,
        graph=graph,
        backend=backend,
        batch=int(reference.images.shape[0]),
        seed=reference.seed,
        tolerances=asdict(tolerances),
        outputs=outputs,
        routing=checked,
        routing_status=status,
        seconds=time.perf_counter() - start if start is not None else 0.0,
        notes=notes,
        precision=graph_precision,
        routing_precision=routing_precision,
        soft_routing=soft,
    )


def _check_comparable(plain: list[str], expected, actual: dict, source: str) -> None:
    """One line where the graph's outputs are not the model's: another count, or another shape (outputs of
    different shapes are not compared: they would broadcast or fail)."""
    if len(plain) != len(expected):
        raise UserError(
            f"the graph has {len(plain)} outputs but the model {len(expected)}; was it exported from {source}?"
        )
    for n, e in zip(plain, expected):
        if np.shape(actual[n]) != np.shape(e):
            got, want = ("x".join(map(str, np.shape(v))) or "scalar" for v in (actual[n], e))
            raise UserError(
                f"the graph's output {n} is {got} but the model's output is {want}: they cannot be compared; "
                f"was the graph exported from {source}?"
            )


def _with_plugin_routing(actual: dict, header: onnx.ModelProto, routing: dict, routers) -> tuple[dict, list[str]]:
    """The outputs with the decisions of another author's top-k layers, read from their TopKRoute
    plugin's tensors after the rewrite, and the layers whose routing the graph records."""
    recorded = routing_layers(header)
    for layer, route in plugin_routes(header).items():
        names = routing_output_names(layer)
        if layer in recorded or layer not in routing or not {route["expert"], route["slot"]} <= set(routers or {}):
            continue
        found = plugin_routing(route, routers[route["expert"]], routers[route["slot"]])
        actual = {**actual, **dict(zip(names, (found["expert"], found["kept"], found["slot"])))}
        recorded = [*recorded, layer]
    return actual, recorded


def _compare_routing(reference: Reference, actual: dict, recorded: list[str], tolerances: settings.Tolerances):
    """Every V-MoE layer's decisions the graph exposes against the reference's: ``(the reference's
    routing compared, status, RoutingParity per layer, notes)``."""
    exposed = [layer for layer in recorded if all(n in actual for n in routing_output_names(layer))]
    routing = {k: r for k, r in reference.routing.items() if k not in reference.derived or k in exposed}
    if not routing:
        return routing, ROUTING_NONE, [], []
    if not exposed:
        notes = ["routing not compared: export with `routing_outputs=True` to check routing decisions"]
        return routing, ROUTING_NOT_EXPOSED, [], notes
    missing = sorted(set(routing) - set(exposed))
    if missing:
        raise UserError(f"the graph exposes no routing for {missing}; was it exported from {reference.model}?")
    checked = [compare_routing(layer, routing[layer], actual, tolerances.routing_agreement) for layer in routing]
    return routing, ROUTING_CHECKED, checked, []


def _compare_routers(reference: Reference, header, routing: dict, checked, actual, routers, errors):
    """With the backend's router tensors: every flipped V-MoE decision explained (in ``checked``, in
    place) and each Soft-MoE layer's dispatch and combine weights compared (returned)."""
    named = router_tensors(header)
    settings_of = {**{layer: r["attrs"] for layer, r in plugin_routes(header).items()}, **vmoe_layers(header)}
    for r in checked:
        names, ref = named.get(r.layer, {}), reference.routers.get(r.layer, {})
        if "gates" in names and names["gates"] in routers and "gates" in ref:
            bpr = bool(settings_of.get(r.layer, {}).get("batch_priority"))
            gates = routers[names["gates"]]
            explain_flips(r, routing[r.layer], actual, ref["gates"], gates, batch_priority=bpr, image_errors=errors)
    soft = []
    for layer, names in named.items():
        ref = reference.routers.get(layer, {})
        if "dispatch" in names and {"dispatch", "combine"} <= set(ref) and all(n in routers for n in names.values()):
            soft.append(compare_soft_routing(layer, ref, {k: routers[n] for k, n in names.items()}))
    return soft


def onnx_parity(
    reference: Reference,
    path: str | Path,
    header: onnx.ModelProto,
    *,
    graph: str,
    tolerances: settings.Tolerances,
    doing: str | None = None,
    start: float | None = None,
) -> ParityReport:
    """A graph in ONNX Runtime (CPU) against the reference (``compare_to_reference``), its router
    tensors exposed. An FP32 graph with bfloat16 dispatch whose check fails is checked again against
    PyTorch rounding to bfloat16 as the graph did where float32 noise decides (``RoundingParity``):
    FP32's tolerance then holds for a correct graph, and the report says how many elements that took.
    ``doing`` names the ONNX Runtime step (default: "Running ONNX Runtime (<backend>)")."""
    backend = ort_backend_name(header)
    with phase(log, doing or f"Running ONNX Runtime ({backend})"):
        actual, internals = onnxruntime_outputs(path, header, {reference.input_name: reference.images})
    compare = functools.partial(
        compare_to_reference, actual=actual, header=header, graph=graph, backend=backend, tolerances=tolerances
    )
    report = compare(reference, start=start, routers=internals)
    roundings = bfloat16_roundings(header)
    if report.passed or reference.source is None:
        return report
    if not roundings:
        config = reference.source.config
        if config is not None and config.bf16_dispatch:
            report.notes.append(
                f"{reference.model} rounds its expert inputs and outputs to bfloat16 (bf16 dispatch) and the "
                "graph rounds nothing: export it with `bf16_dispatch=True`, or validate with `bf16_dispatch=False`"
            )
        return report
    with phase(log, "Running PyTorch again, rounding to bfloat16 as the graph did where float32 noise decides"):
        loaded = load(reference.source)
        with rounding_as([internals[n] for n in roundings], tolerances.rtol) as found:
            outputs, routing, routers = _torch_run(loaded.module, reference.images, plugin_routes(header))
        del loaded
        gc.collect()
    if len(found) != len(roundings) or None in found:
        report.notes.append(
            f"the graph rounds {len(roundings)} tensors to bfloat16 and the model {len(found)}, not the same ones: "
            "was the graph exported from this model with the same `bf16_dispatch`?"
        )
        return report
    rerun = dataclasses.replace(reference, outputs=outputs, routing=routing, routers=routers)
    before = max((o.max_rel for o in report.outputs), default=0.0)
    report = compare(rerun, start=start, routers=internals)
    at_midpoint, unexplained = sum(f[1] for f in found), sum(f[2] for f in found)
    report.rounding = RoundingParity(
        roundings=len(found),
        elements=sum(f[0] for f in found),
        at_midpoint=at_midpoint,
        unexplained=unexplained,
        max_rel_before=before,
        passed=unexplained == 0,
    )
    return report


__all__ = [
    "OutputParity",
    "ParityReport",
    "Reference",
    "RoutingParity",
    "compare_runner",
    "compare_to_reference",
    "make_inputs",
    "onnx_parity",
    "recorded_source",
    "reference_run",
    "stored_reference",
]
