"""Routing-aware parity: outputs within tolerance, and per V-MoE layer the same expert and the same
kept/dropped decision for every (token, choice), with buffer slots compared and reported.

A buffer slot that differs while expert and kept/dropped agree for every pair is a reordering inside
one expert's buffer: tokens whose priorities tie in one runtime and differ by a rounding error in the
other swap places. The same tokens reach the same experts with the same weights, so outputs are
unaffected; such swaps are counted and shown, and do not fail the check. Any difference in expert or
kept/dropped (the decisions that cascade through a buffer) does.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporter import settings
from exporter.errors import UserError
from exporter.export import ROUTING_LAYERS_KEY, ROUTING_PREFIX, routing_output_names
from exporter.routing import TopKRouting
from exporter.runners import graph_inputs, read_onnx_header, run_onnxruntime, run_torch
from exporter.source import METADATA_KEY, LoadedModel, ModelSource, check_batch, default_batch, load

ROUTING_CHECKED, ROUTING_NOT_EXPOSED, ROUTING_NONE = "checked", "not exposed by the graph", "no V-MoE layers"


@dataclass
class OutputParity:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max|actual - expected| / max|expected|
    passed: bool


@dataclass
class RoutingParity:
    layer: str
    pairs: int  # (token, choice) pairs compared
    expert: float  # share with the same expert
    kept: float  # share with the same kept/dropped decision
    slot: float  # share with the same buffer slot
    agreement: float  # share where all three agree
    dropped_expected: float  # share of pairs dropped by the reference
    dropped_actual: float
    passed: bool
    decisions: float = 1.0  # share with the same expert and kept/dropped decision: the pass criterion
    slot_swaps: int = 0  # pairs with the same decisions in another slot of the same buffer


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

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(r.passed for r in self.routing)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def compare_output(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float) -> OutputParity:
    if expected.shape != actual.shape:
        return OutputParity(name, list(actual.shape), float("inf"), float("inf"), False)
    expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
    max_abs = float(np.max(np.abs(actual64 - expected64))) if expected.size else 0.0
    scale = float(np.max(np.abs(expected64))) if expected.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    finite = bool(np.isfinite(actual64).all() == np.isfinite(expected64).all())
    return OutputParity(name, list(actual.shape), max_abs, max_rel, finite and max_rel <= rtol)


def compare_routing(
    layer: str, expected: TopKRouting, actual: dict[str, np.ndarray], min_agreement: float
) -> RoutingParity:
    expert_name, kept_name, slot_name = routing_output_names(layer)
    e_ref, s_ref = expected.expert.numpy(), expected.slot.numpy()
    k_ref = s_ref >= 0
    e_act, k_act, s_act = actual[expert_name], actual[kept_name].astype(bool), actual[slot_name]
    if e_act.shape != e_ref.shape:
        raise UserError(
            f"routing of {layer} has shape {list(e_act.shape)} in the graph but {list(e_ref.shape)} in the model; "
            "was the graph exported from this model and routing configuration?"
        )
    same_e, same_k, same_s = e_act == e_ref, k_act == k_ref, s_act == s_ref
    agreement = float(np.mean(same_e & same_k & same_s))
    decisions = float(np.mean(same_e & same_k))
    # With every expert and kept decision equal, each expert's buffer holds the same tokens in both
    # runs, so differing slots can only be a reordering of that buffer.
    swaps = int(np.sum(same_e & same_k & ~same_s)) if decisions == 1.0 else 0
    return RoutingParity(
        layer=layer,
        pairs=int(e_ref.size),
        expert=float(np.mean(same_e)),
        kept=float(np.mean(same_k)),
        slot=float(np.mean(same_s)),
        agreement=agreement,
        dropped_expected=float(np.mean(~k_ref)),
        dropped_actual=float(np.mean(~k_act)),
        passed=decisions >= min_agreement,
        decisions=decisions,
        slot_swaps=swaps,
    )


def source_of(graph_path: str | Path, header, source: ModelSource | None) -> ModelSource:
    if source is not None:
        return source
    text = {p.key: p.value for p in header.metadata_props}.get(METADATA_KEY)
    if text is None:
        raise UserError(f"{graph_path} does not say which model it was exported from; pass --model or --module")
    return ModelSource.from_json(text)


def make_inputs(
    header, loaded: LoadedModel, *, batch: int | None, seed: int, inputs_npz: str | None
) -> tuple[str, np.ndarray]:
    inputs = graph_inputs(header)
    if len(inputs) != 1:
        raise UserError(f"the graph has {len(inputs)} inputs; only single-input image models are supported")
    name = inputs[0].name
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if inputs_npz:
        try:
            with np.load(inputs_npz) as data:
                if name in data:
                    array = data[name]
                elif len(data.files) == 1:
                    array = data[data.files[0]]
                else:
                    raise UserError(f"{inputs_npz} holds {data.files}, none named {name!r}")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read inputs from {inputs_npz}: {type(e).__name__}: {e}") from None
        array = np.ascontiguousarray(array, dtype=np.float32)
    else:
        rng = np.random.default_rng(seed)
        array = rng.standard_normal((batch or default_batch(loaded), *loaded.source.input_shape), dtype=np.float32)
    fits = len(dims) == array.ndim and all(d in (None, 0, s) for d, s in zip(dims, array.shape))
    if not fits:
        want = "x".join("N" if d in (None, 0) else str(d) for d in dims)
        raise UserError(f"input shape {'x'.join(map(str, array.shape))} does not match the graph's {name} ({want})")
    check_batch(array.shape[0], loaded)
    return name, array


@dataclass
class Reference:
    """PyTorch's answer on one input batch: what every backend is compared against."""

    model: str
    input_name: str
    images: np.ndarray
    outputs: list[np.ndarray]  # the model's flat outputs, in order
    routing: dict[str, TopKRouting]
    seed: int | None  # None when the images came from a file
    stored: str | None = None  # where stored outputs came from, when PyTorch did not run now

    def named_outputs(self, header: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The outputs under the graph's output names, routing outputs included (as the graph types them)."""
        names = [o.name for o in header.graph.output]
        plain = [n for n in names if not n.startswith(ROUTING_PREFIX)]
        named = dict(zip(plain, self.outputs))
        for layer, r in self.routing.items():
            expert, kept, slot = routing_output_names(layer)
            named.update({expert: r.expert.numpy().astype(np.int32), kept: r.slot.numpy() >= 0})
            named[slot] = r.slot.numpy().astype(np.int32)
        return {n: named[n] for n in names if n in named}


def reference_run(
    source: ModelSource,
    header: onnx.ModelProto,
    *,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
    loaded: LoadedModel | None = None,
) -> Reference:
    """Builds the PyTorch model (unless ``loaded`` is given) and runs it on seeded random images (or
    ``inputs_npz``) shaped for the graph."""
    if loaded is None:
        with step(f"Building {source.name} in PyTorch"):
            loaded = load(source)
    name, images = make_inputs(header, loaded, batch=batch, seed=seed, inputs_npz=inputs_npz)
    with step(f"Running PyTorch on {images.shape[0]} images"):
        expected, routing = run_torch(loaded.module, images)
    del loaded  # big models: free this reference to PyTorch's weights before another runtime loads its own
    gc.collect()
    return Reference(source.name, name, images, expected, routing, None if inputs_npz else seed)


def compare_to_reference(
    reference: Reference,
    actual: dict[str, np.ndarray],
    header: onnx.ModelProto,
    *,
    graph: str,
    backend: str,
    tolerances: settings.Tolerances = settings.FP32_TOLERANCES,
    start: float | None = None,
) -> ParityReport:
    """Outputs within tolerance and, for every V-MoE layer the graph exposes, the same routing decisions."""
    expected, routing, source = reference.outputs, reference.routing, reference.model
    plain = [n for n in actual if not n.startswith(ROUTING_PREFIX)]
    if len(plain) != len(expected):
        raise UserError(
            f"the graph has {len(plain)} outputs but the model {len(expected)}; was it exported from {source}?"
        )
    outputs = [compare_output(n, e, actual[n], tolerances.rtol) for n, e in zip(plain, expected)]
    exposed = json.loads({p.key: p.value for p in header.metadata_props}.get(ROUTING_LAYERS_KEY, "[]"))
    exposed = [layer for layer in exposed if all(n in actual for n in routing_output_names(layer))]
    notes = []
    if not routing:
        status, checked = ROUTING_NONE, []
    elif not exposed:
        status, checked = ROUTING_NOT_EXPOSED, []
        notes.append("routing not compared: export with --routing-outputs to check routing decisions")
    else:
        status = ROUTING_CHECKED
        missing = sorted(set(routing) - set(exposed))
        if missing:
            raise UserError(f"the graph exposes no routing for {missing}; was it exported from {source}?")
        checked = [compare_routing(layer, routing[layer], actual, tolerances.routing_agreement) for layer in routing]
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
    )


def validate_onnx(
    graph_path: str | Path,
    source: ModelSource | None = None,
    *,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    tolerances: settings.Tolerances = settings.FP32_TOLERANCES,
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
    header: onnx.ModelProto | None = None,
) -> ParityReport:
    """Runs PyTorch and ONNX Runtime (CPU) on the same inputs and compares outputs and routing.

    Args:
        graph_path: The exported .onnx.
        source: The model to compare against; by default the one recorded in the graph's metadata.
        batch: Images per run (a multiple of the routing group); default one group.
        seed: Seed of the random inputs (ignored with ``inputs_npz``).
        inputs_npz: A .npz with the input array (named after the graph input, or alone).
        tolerances: Pass criteria.
        step: Context-manager factory the CLI uses to show progress.
        header: The graph without weights, if the caller has already read it (``read_onnx_header``).
    """
    start = time.perf_counter()
    header = header if header is not None else read_onnx_header(graph_path)
    source = source_of(graph_path, header, source)
    reference = reference_run(source, header, batch=batch, seed=seed, inputs_npz=inputs_npz, step=step)
    with step("Running ONNX Runtime (CPU)"):
        actual = run_onnxruntime(graph_path, {reference.input_name: reference.images})
    return compare_to_reference(
        reference, actual, header, graph=str(graph_path), backend="onnxruntime-cpu", tolerances=tolerances, start=start
    )


def validate_engine(
    engine_path: str | Path,
    graph_path: str | Path,
    source: ModelSource | None = None,
    *,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    tolerances: settings.Tolerances = settings.FP32_TOLERANCES,
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
    reference: Reference | None = None,
) -> ParityReport:
    """Runs PyTorch and a TensorRT engine on the same inputs and compares outputs and routing.

    ``graph_path`` is the ONNX graph the engine was built from: it names the inputs, outputs and the
    V-MoE layers whose routing the engine exposes, and records the model. ``reference`` (e.g. the
    PyTorch outputs a bundle stores) replaces the PyTorch run.
    """
    from exporter.engine import EngineRunner, require_tensorrt

    require_tensorrt("validating an engine")
    start = time.perf_counter()
    header = read_onnx_header(graph_path)
    if reference is None:
        source = source_of(graph_path, header, source)
        reference = reference_run(source, header, batch=batch, seed=seed, inputs_npz=inputs_npz, step=step)
    with step("Running the TensorRT engine"), EngineRunner(engine_path) as runner:
        actual = runner.infer({reference.input_name: reference.images})
    order = [o.name for o in header.graph.output]
    actual = {n: actual[n] for n in order if n in actual}
    report = compare_to_reference(
        reference, actual, header, graph=str(engine_path), backend="tensorrt", tolerances=tolerances, start=start
    )
    if reference.stored:
        report.notes.append(f"reference: {reference.stored}")
    return report


__all__ = [
    "OutputParity",
    "ParityReport",
    "Reference",
    "RoutingParity",
    "compare_to_reference",
    "reference_run",
    "validate_engine",
    "validate_onnx",
]
