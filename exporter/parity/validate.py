"""Validation of a graph, an engine or a bundle against PyTorch: ``validate(target)`` is what
``moe-export validate TARGET`` does; ``validate_onnx`` and ``validate_engine`` are its two backends."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from exporter import settings
from exporter.errors import UserError
from exporter.formats.bundle import is_bundle, open_bundle, resolve_engine
from exporter.formats.graph import precision, read_header, recorded_batch
from exporter.parity.parity import (
    ParityReport,
    Reference,
    compare_runner,
    onnx_parity,
    recorded_source,
    reference_run,
    stored_reference,
)
from exporter.settings import Precision
from exporter.sources.loading import ModelSource

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan")


def validate(
    target: str | Path,
    source: ModelSource | None = None,
    *,
    changes: Callable[[ModelSource], ModelSource] | None = None,
    engine_graph: str | Path | None = None,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    rtol: float | None = None,
    routing_agreement: float | None = None,
    trust_module: bool = False,
    verify_key: str | Path | None = None,
) -> ParityReport:
    """Checks ``target`` against PyTorch, outputs and routing decisions.

    ``target`` is an .onnx file (run with ONNX Runtime on CPU), an engine file (with ``engine_graph``,
    the ONNX graph it was built from, or beside a bundle manifest) or a bundle folder (its engine on
    its sample inputs against the PyTorch outputs the bundle stores: no model code needed). The model
    is ``source``, else the one the graph records, passed through ``changes`` when given (other
    routing settings, weights or seed: the CLI's model options); the batch is ``batch``, else the N
    export was given (``formats.graph.recorded_batch``), else one routing group. ``rtol`` and
    ``routing_agreement`` override the tolerances of the precision (an ONNX graph's as its metadata
    records it; an engine's as its bundle records it). A user module the graph records is imported only
    with ``trust_module`` (or when ``source`` names it): a graph is data, never code to run. With
    ``verify_key`` (an Ed25519 public key file), a bundle's signature is checked first.
    """
    target = Path(target)
    asked = _Asked(source, changes, batch, seed, inputs_npz, rtol, routing_agreement, trust_module)
    if not (target.is_dir() or target.suffix in ENGINE_SUFFIXES):
        if engine_graph:
            raise UserError("`engine_graph` applies to engine files; the target is already an ONNX graph")
        if verify_key:
            raise UserError("`verify_key` checks a bundle's signature: give the bundle folder (or its engine)")
        header = read_header(target)
        batch = batch if batch is not None or inputs_npz else recorded_batch(header)
        source, notes = _source(asked, target, header)
        tolerances = _tolerances(precision(header)[0], rtol, routing_agreement)
        report = validate_onnx(
            target,
            source,
            batch=batch,
            seed=seed,
            inputs_npz=inputs_npz,
            tolerances=tolerances,
            header=header,
        )
        report.notes += notes
        return _note_ignored(report, routing_agreement)
    return _note_ignored(_validate_engine_target(target, engine_graph, verify_key, asked), routing_agreement)


@dataclass(frozen=True)
class _Asked:
    """What ``validate`` was asked, beside the target: the model (or changes to the recorded one), the
    inputs and the tolerances."""

    source: ModelSource | None
    changes: Callable[[ModelSource], ModelSource] | None
    batch: int | None
    seed: int
    inputs_npz: str | None
    rtol: float | None
    routing_agreement: float | None
    trust_module: bool


def _validate_engine_target(target: Path, engine_graph, verify_key, asked: _Asked) -> ParityReport:
    """``validate`` of an engine file or a bundle folder: a bundle's own samples and stored PyTorch outputs
    where nothing else is asked for (no model, nor its checkpoint, needed on the target)."""
    folder = target if target.is_dir() else target.parent
    if not is_bundle(folder) and verify_key:
        raise UserError(f"`verify_key` checks a bundle's signature; {folder} holds no bundle manifest")
    _, notes = open_bundle(folder, verify_key) if is_bundle(folder) else (None, [])
    engine, graph, sample, engine_precision = resolve_engine(target, engine_graph)
    use_sample = sample is not None and asked.batch is None and asked.inputs_npz is None
    given = asked.source is not None or asked.changes is not None
    reference = stored_reference(sample.parent) if use_sample and not given else None
    source, seed_notes = (None, []) if reference is not None else _source(asked, graph, read_header(graph))
    report = validate_engine(
        engine,
        graph,
        source,
        batch=asked.batch,
        seed=asked.seed,
        inputs_npz=str(sample) if use_sample else asked.inputs_npz,
        tolerances=_tolerances(engine_precision or Precision.FP32, asked.rtol, asked.routing_agreement),
        reference=reference,
    )
    report.notes += notes + seed_notes
    return report


def _note_ignored(report: ParityReport, routing_agreement: float | None) -> ParityReport:
    if routing_agreement is not None and not report.routing:
        report.notes.append(
            f"`min_routing_agreement` is ignored: no routing decisions were compared ({report.routing_status})"
        )
    return report


def _source(asked: _Asked, graph: Path, header: onnx.ModelProto) -> tuple[ModelSource, list[str]]:
    """``source``, else the model the graph records passed through ``changes``; and a note when its
    seed is not the seed the graph records (saying which one is used)."""
    if asked.source is not None:
        return asked.source, []
    recorded = recorded_source(graph, header, trust_module=asked.trust_module)
    if asked.changes is None:
        recorded.verify_checkpoint()  # still the weights it was exported with
        return recorded, []
    source = asked.changes(recorded)
    if source.seed == recorded.seed:
        return source, []
    used = f"`seed={source.seed}` is used, not the seed {recorded.seed} {graph.name} records"
    if source.checkpoint:
        return source, [f"{used}; it changes nothing here: the weights come from {source.checkpoint}"]
    return source, [f"{used}: PyTorch's random weights are not the ones the graph was exported with"]


def _tolerances(precision: str, rtol: float | None, routing_agreement: float | None) -> settings.Tolerances:
    """The precision's tolerances with the given overrides."""
    base = settings.TOLERANCES.get(precision, settings.FP32_TOLERANCES)
    changes = {k: v for k, v in dict(rtol=rtol, routing_agreement=routing_agreement).items() if v is not None}
    return dataclasses.replace(base, **changes)


def validate_onnx(
    graph_path: str | Path,
    source: ModelSource | None = None,
    *,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    tolerances: settings.Tolerances | None = None,
    header: onnx.ModelProto | None = None,
    trust_module: bool = False,
) -> ParityReport:
    """Runs PyTorch and ONNX Runtime (CPU) on the same inputs and compares outputs and routing.

    Args:
        graph_path: The exported .onnx.
        source: The model to compare against; by default the one recorded in the graph's metadata.
        batch: Images per run (a multiple of the routing group); default one group.
        seed: Seed of the random inputs (ignored with ``inputs_npz``).
        inputs_npz: A .npz with the input array (named after the graph input, or alone).
        tolerances: Pass criteria; by default those of the graph's precision (``settings.TOLERANCES``).
        header: The graph without weights, if the caller has already read it (``read_header``).
        trust_module: Import the user module the graph records (``recorded_source``), when no source is given.
    """
    start = time.perf_counter()
    header = header if header is not None else read_header(graph_path)
    tolerances = tolerances or settings.TOLERANCES[precision(header)[0]]
    source = source or recorded_source(graph_path, header, trust_module=trust_module)
    reference = reference_run(source, header, batch=batch, seed=seed, inputs_npz=inputs_npz)
    return onnx_parity(reference, graph_path, header, graph=str(graph_path), tolerances=tolerances, start=start)


def validate_engine(
    engine_path: str | Path,
    graph_path: str | Path,
    source: ModelSource | None = None,
    *,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    inputs_npz: str | None = None,
    tolerances: settings.Tolerances | None = None,
    reference: Reference | None = None,
    trust_module: bool = False,
) -> ParityReport:
    """Runs PyTorch and a TensorRT engine on the same inputs and compares outputs and routing.

    ``graph_path`` is the ONNX graph the engine was built from: it names the inputs, outputs and the
    V-MoE layers whose routing the engine exposes, and records the model. ``reference`` (e.g. the
    PyTorch outputs a bundle stores) replaces the PyTorch run.
    """
    from exporter.backends.tensorrt import EngineRunner, require_tensorrt

    require_tensorrt("validating an engine")
    start = time.perf_counter()
    header = read_header(graph_path)
    tolerances = tolerances or settings.TOLERANCES[precision(header)[0]]  # the engine is typed as its graph
    if reference is None:
        source = source or recorded_source(graph_path, header, trust_module=trust_module)
        reference = reference_run(source, header, batch=batch, seed=seed, inputs_npz=inputs_npz)
    runner = EngineRunner(engine_path)
    report = compare_runner(reference, runner, header, graph=str(engine_path), tolerances=tolerances, start=start)
    if reference.stored:
        report.notes.append(f"reference: {reference.stored}")
    return report


__all__ = ["validate", "validate_engine", "validate_onnx"]
