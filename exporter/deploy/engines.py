"""TensorRT engines of bundles and graphs: build, check the plugin layers, validate, record in the
manifest; and a Triton Inference Server entry for a bundle's engine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exporter import settings
from exporter.backends.tensorrt_rtx import BACKEND as RTX_BACKEND
from exporter.backends.tensorrt_rtx import NOT_RUN
from exporter.errors import UserError
from exporter.fileio import atomic_path, write_json
from exporter.formats.bundle import (
    ENGINE,
    MANIFEST,
    PLUGINS,
    PORTABLE,
    PTX_DIR,
    check_files,
    copy_bundle,
    file_entry,
    is_bundle,
    open_bundle,
    read_manifest,
)
from exporter.formats.graph import ROUTING_PREFIX, batch_multiple, read_header
from exporter.progress import phase

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # parity imports torch: only once TensorRT is known to be here (a refusal is instant)
    from exporter.parity.parity import ParityReport
    from exporter.sources.loading import ModelSource


@dataclass
class BundleEngine:
    """``build engine`` on a bundle: the build, and TensorRT's parity against PyTorch."""

    bundle: Path
    build: object  # exporter.backends.tensorrt.EngineBuild
    parity: ParityReport

    @property
    def passed(self) -> bool:
        return self.parity.passed

    def to_dict(self) -> dict:
        return {
            "bundle": str(self.bundle),
            "engine": self.build.to_dict(),
            "parity": self.parity.to_dict(),
            "passed": self.passed,
        }


def build_bundle_engine(
    bundle: str | Path,
    options=None,
    *,
    portable: bool = False,
) -> BundleEngine:
    """Builds ``model.engine`` in a bundle from its plugin graph (or ``portable``: its portable graph),
    with the bundle's precompiled PTX, validates it against PyTorch on the bundle's sample inputs and
    records it in the manifest.

    Raises:
        TensorRTUnavailable: no TensorRT or GPU here (the bundle is left as it is).
        CheckFailed: the engine lacks its plugin layers; parity is reported, not raised.
    """
    from exporter.backends.tensorrt import EngineOptions, build_engine, graph_precision, require_tensorrt
    from plugins.aot import PTX_DIR_ENV

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    options = options or EngineOptions()
    options.check()
    sample = manifest["sample"]["batch"]
    if options.opt_batch is None and options.max_batch is None:  # the profile covers the sample batch
        options = dataclasses.replace(options, opt_batch=sample, max_batch=sample)
    low, high = options.min_batch or 1, options.max_batch or options.opt_batch
    if not low <= sample <= high:
        raise UserError(f"the bundle's {sample} sample images are outside the batch profile {low}-{high}")
    check_files(bundle, None, manifest)  # never build on a changed file (the old engine included)
    graph = bundle / (PORTABLE if portable else PLUGINS)
    graph_precision(graph, options.precision)  # strongly typed: the graph's own precision, or refused
    require_tensorrt(f"building the engine of {bundle}")  # before torch is imported: a refusal is instant
    from exporter.parity.parity import stored_reference
    from exporter.parity.validate import validate_engine

    os.environ.setdefault(PTX_DIR_ENV, str((bundle / PTX_DIR).resolve()))
    # built and checked beside the bundle's engine, then moved onto it just before the manifest that
    # records it: a failure on the way leaves the bundle as it was
    with atomic_path(bundle / ENGINE) as new_engine:
        build = build_engine(
            graph,
            new_engine,
            options,
            batch_multiple=manifest["model"]["batch_multiple"],
        )
        parity = validate_engine(
            new_engine,
            graph,
            tolerances=settings.TOLERANCES[build.precision],
            reference=stored_reference(bundle),
        )
    build = dataclasses.replace(build, path=bundle / ENGINE)
    manifest["engine"] = {
        "file": ENGINE,
        "graph": graph.name,
        "precision": build.precision,
        "tensorrt": build.tensorrt,
        "batch": build.batch,
        "plugin_layers": build.plugin_layers,
        "parity": parity.summary(),
    }
    manifest["files"][ENGINE] = file_entry(bundle / ENGINE)  # the engine only: the rest was checked first
    write_json(bundle / MANIFEST, manifest)
    return BundleEngine(bundle, build, parity)


def triton_entry(bundle: str | Path, repo: str | Path, *, max_batch: int | None = None, model_name: str | None = None):
    """A Triton Inference Server model-repository entry for a bundle's engine (``exporter.deploy.triton_repo``).

    Without an engine in the bundle the config is written alone (the entry is marked incomplete).
    """
    from exporter.deploy.triton_repo import IOSpec, write_triton_repo

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_files(bundle, None, manifest)
    engine = manifest.get("engine")
    group = manifest["model"]["batch_multiple"]
    if max_batch is None:
        max_batch = engine["batch"]["max"] if engine else manifest["sample"]["batch"]

    def spec(entry: dict) -> IOSpec:
        return IOSpec(entry["name"], entry["dtype"], [d if isinstance(d, int) else None for d in entry["shape"]])

    # a folder name inside the repository, whatever the manifest says (never "..", "/" or a hidden name)
    name = model_name or re.sub(r"[^A-Za-z0-9_.-]", "_", manifest["model"]["name"]).lstrip(".") or "model"
    plugins = "none" if engine and engine["graph"] == PORTABLE else "aot"
    outputs = manifest["outputs"]
    if group > 1:  # routing outputs are [groups, S, k]: their first axis is not the batch Triton splits
        outputs = [o for o in outputs if not o["name"].startswith(ROUTING_PREFIX)]
    entry = write_triton_repo(
        repo,
        name,
        engine_path=bundle / ENGINE if engine else None,
        inputs=[spec(e) for e in manifest["inputs"]],
        outputs=[spec(e) for e in outputs],
        max_batch=max_batch,
        batch_multiple=group,
        plugins=plugins,
    )
    if len(outputs) < len(manifest["outputs"]):
        entry.notes.append(
            "the routing outputs are not served: their first axis counts routing groups, not images "
            "(validate routing with `moe-export validate` on the bundle)"
        )
    return entry


def build_onnx_engine(
    graph: str | Path,
    out_dir: str | Path,
    options=None,
    *,
    trust_module: bool = False,
) -> BundleEngine:
    """``build engine`` on an exported ONNX file: ``out_dir/<stem>.engine``, validated against the
    model the graph records (Triton compiles plugin kernels on the spot: there is no precompiled PTX)."""
    from exporter.backends.tensorrt import EngineOptions, build_engine, graph_precision, require_tensorrt

    graph = Path(graph)
    header = read_header(graph)
    options = options or EngineOptions()
    options.check()
    graph_precision(graph, options.precision)
    require_tensorrt(f"building an engine from {graph}")
    from exporter.parity.validate import validate_engine

    group = batch_multiple(header)
    engine = Path(out_dir) / f"{graph.stem}.engine"
    build = build_engine(graph, engine, options, batch_multiple=group)
    parity = validate_engine(engine, graph, tolerances=settings.TOLERANCES[build.precision], trust_module=trust_module)
    return BundleEngine(Path(out_dir), build, parity)


@dataclass
class EngineRun:
    """What ``build engine`` did: the bundle it wrote first (if any), the engine and its parity, and
    the Triton Inference Server entry (if asked for and parity passed)."""

    built: BundleEngine
    bundle: object | None = None  # exporter.deploy.bundle.BundleResult
    triton: object | None = None  # exporter.deploy.triton_repo.TritonRepoEntry

    @property
    def passed(self) -> bool:
        return self.built.passed

    def to_dict(self) -> dict:
        data = self.built.to_dict()
        data["triton"] = self.triton.to_dict() if self.triton is not None else None
        return data


@dataclass
class RTXEngines:
    """``build engine --backend tensorrt-rtx``: one engine per target (``RTXEngineBuild``), each run
    against PyTorch where this machine's GPU is of its target, and the bundle written first (if any)."""

    folder: Path
    builds: list  # exporter.backends.tensorrt_rtx.RTXEngineBuild, one per target
    parity: dict[str, ParityReport]  # target -> parity of the engines this machine could run
    bundle: object | None = None  # exporter.deploy.bundle.BundleResult

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity.values())

    @property
    def not_run(self) -> list[str]:
        return [b.target for b in self.builds if b.target not in self.parity]

    def to_dict(self) -> dict:
        engines = []
        for b in self.builds:
            parity = self.parity.get(b.target)
            run = {"parity": parity.to_dict() if parity else None, "run": "ran" if parity else NOT_RUN}
            engines.append({**b.to_dict(), **run})
        return {"folder": str(self.folder), "backend": "tensorrt-rtx", "engines": engines, "passed": self.passed}


def build_rtx_engines(
    graph: str | Path,
    folder: str | Path,
    targets,
    options=None,
    *,
    batch_multiple: int = 1,
    reference=None,
) -> RTXEngines:
    """Builds ``graph`` with TensorRT for RTX for each target into ``folder`` (``<stem>.sm_XX.engine``,
    each written atomically once every target has built) and, for a target this machine's GPU has,
    runs it against ``reference`` (default: PyTorch on the model the graph records). The library call
    behind ``build engine --backend tensorrt-rtx`` (and Q/DQ graphs alike)."""
    from exporter.backends.tensorrt import EngineOptions, graph_precision
    from exporter.backends.tensorrt_rtx import RTXEngineRunner, build_engine, gpu_arch, parse_targets, require_rtx

    graph, folder = Path(graph), Path(folder)
    arches = parse_targets(targets)
    options = options or EngineOptions()
    options.check()
    from exporter.export.precision import check_quantized_targets

    check_quantized_targets(graph_precision(graph, options.precision)[0], arches, str(graph))
    require_rtx(f"building the engines of {graph}")
    stem = graph.name.removesuffix(".onnx").removesuffix(".plugins")
    builds = []
    with contextlib.ExitStack() as stack:  # every engine, or none of them
        for arch in arches:
            path = folder / f"{stem}.sm_{arch}.engine"
            tmp = stack.enter_context(atomic_path(path))
            with phase(log, f"Building {path.name} with TensorRT for RTX (strongly typed, {graph.name})"):
                build = build_engine(graph, tmp, arch, options, batch_multiple=batch_multiple)
            builds.append(dataclasses.replace(build, path=path))
    parity = {}
    here = gpu_arch()
    for build in builds:
        if here is not None and build.target == f"sm_{here}":
            header = read_header(graph)
            from exporter.parity.parity import compare_runner, recorded_source, reference_run

            if reference is None:
                reference = reference_run(recorded_source(graph, header), header)
            tolerances = settings.TOLERANCES[build.precision]
            runner = RTXEngineRunner(build.path)
            parity[build.target] = compare_runner(
                reference, runner, header, graph=str(build.path), tolerances=tolerances
            )
            build.ran = True
    return RTXEngines(folder, builds, parity)


def build_bundle_rtx_engines(
    bundle: str | Path,
    targets,
    options=None,
    *,
    portable: bool = False,
) -> RTXEngines:
    """TensorRT for RTX engines of a bundle's plugin graph (``portable``: its portable graph), one per
    target, with the bundle's precompiled PTX where it has the target's; recorded with their hashes in
    the manifest (``rtx_engines``) and, where this machine's GPU can run one, its parity against the
    PyTorch outputs the bundle stores."""
    from exporter.backends.tensorrt import EngineOptions
    from exporter.parity.parity import stored_reference
    from plugins.aot import PTX_DIR_ENV

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    options = options or EngineOptions()
    options.check()
    check_files(bundle, None, manifest)
    sample = manifest["sample"]["batch"]
    if options.opt_batch is None and options.max_batch is None:
        options = dataclasses.replace(options, opt_batch=sample, max_batch=sample)
    os.environ.setdefault(PTX_DIR_ENV, str((bundle / PTX_DIR).resolve()))
    graph = bundle / (PORTABLE if portable else PLUGINS)
    built = build_rtx_engines(
        graph,
        bundle,
        targets,
        options,
        batch_multiple=manifest["model"]["batch_multiple"],
        reference=stored_reference(bundle),
    )
    engines = manifest.get("rtx_engines") or {}
    for b in built.builds:
        parity = built.parity.get(b.target)
        engines[b.target] = {
            "file": b.path.name,
            "graph": graph.name,
            "precision": b.precision,
            "tensorrt_rtx": b.tensorrt_rtx,
            "batch": b.batch,
            "plugin_layers": b.plugin_layers,
            "fp32_layers": b.fp32_layers,
            "build_seconds": round(b.seconds, 2),
            "parity": parity.summary() if parity else NOT_RUN,
        }
        manifest["files"][b.path.name] = file_entry(b.path)
    manifest["rtx_engines"] = engines
    write_json(bundle / MANIFEST, manifest)
    return built


def _is_model(source) -> bool:
    """A ModelSource rather than a path (to a bundle or a graph)."""
    return source is not None and not isinstance(source, str | Path)


def check_engine_request(
    source: str | Path | ModelSource | None,
    *,
    output_dir: str | Path | None = None,
    options=None,
    targets=None,
    backend: str = "tensorrt",
    triton_repo: str | Path | None = None,
    verify_key: str | Path | None = None,
):
    """Everything ``build_engine_for`` checks before any work (the profile, the backend and its targets,
    what to build from and where to), one line each; returns the options to use."""
    from exporter.backends.tensorrt import EngineOptions

    options = options or EngineOptions()
    options.check()
    if backend not in ("tensorrt", RTX_BACKEND):
        raise UserError(f"unknown backend {backend!r}; known: tensorrt, {RTX_BACKEND}")
    if backend == RTX_BACKEND:
        from exporter.backends.tensorrt_rtx import check_targets

        check_targets(targets)  # an RTX target or one line, before any work
        if triton_repo:
            raise UserError("`triton_repo` serves TensorRT engines; TensorRT for RTX engines are for RTX applications")
    model = _is_model(source)
    if triton_repo and source and not model and not is_bundle(source):
        raise UserError("`triton_repo` needs a bundle (its manifest names the inputs and outputs)")
    if verify_key is not None and not (source and not model and is_bundle(source)):
        raise UserError("`verify_key` checks a bundle's signature: give the bundle folder")
    if model and not output_dir:
        raise UserError("give `output_dir`: the bundle folder to write")
    if source is None:
        raise UserError("give a bundle folder, an exported .onnx or a model (`source`)")
    if not model and not is_bundle(source):
        if Path(source).suffix != ".onnx":
            raise UserError(f"{source} is neither a moe-export bundle nor an .onnx file")
        if not output_dir:
            raise UserError("give `output_dir`: the folder for the engine")
    return options


def build_engine_for(
    source: str | Path | ModelSource | None,
    *,
    output_dir: str | Path | None = None,
    options=None,
    portable: bool = False,
    targets=None,
    backend: str = "tensorrt",
    triton_repo: str | Path | None = None,
    verify_key: str | Path | None = None,
    trust_module: bool = False,
) -> EngineRun:
    """What ``moe-export build engine`` does, from a bundle folder, an exported .onnx (the engine goes
    to ``output_dir``) or a model (a ``ModelSource``: its bundle is written to ``output_dir`` first, on
    CPU, and returned as the run's ``bundle``). With ``triton_repo``, an engine that passed parity also
    gets a Triton Inference Server entry. ``verify_key`` (a bundle): its Ed25519 signature is checked
    first. ``trust_module`` (an .onnx): the user module it records may be imported.
    ``backend="tensorrt-rtx"`` builds one TensorRT for RTX engine per target instead (``targets``: the
    RTX GPUs, which the bundle written first precompiles its kernels for too) and returns ``RTXEngines``.
    Everything is checked first (``check_engine_request``).

    Raises:
        TensorRTUnavailable: no TensorRT or GPU here; a bundle written first is kept and complete.
    """
    from exporter.backends.tensorrt import TensorRTUnavailable

    request = dict(options=options, targets=targets, backend=backend, triton_repo=triton_repo, verify_key=verify_key)
    options = check_engine_request(source, output_dir=output_dir, **request)
    rtx = backend == RTX_BACKEND
    written, notes = None, []
    if _is_model(source):
        from exporter.deploy.bundle import build_bundle

        precision = options.precision or settings.DEFAULT_PRECISION
        written = build_bundle(source, output_dir, targets=targets, precision=precision)
        bundle = Path(output_dir)
    elif is_bundle(source):
        bundle = Path(source)
        _, notes = open_bundle(bundle, verify_key)  # the signature, every file, what is unlisted
        if output_dir and Path(output_dir).resolve() != bundle.resolve():
            bundle = copy_bundle(bundle, output_dir)  # the listed files only, links never followed
    elif rtx:  # an exported .onnx
        group = batch_multiple(read_header(source))
        return build_rtx_engines(source, output_dir, targets, options, batch_multiple=group)
    else:
        return EngineRun(build_onnx_engine(source, output_dir, options, trust_module=trust_module))
    if rtx:
        built = build_bundle_rtx_engines(bundle, targets, options, portable=portable)
        built.bundle = written
        return built
    try:
        built = build_bundle_engine(bundle, options, portable=portable)
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(f"{e}. The bundle in {bundle} is complete: build its engine on the target") from None
    built.parity.notes += notes
    entry = None
    if triton_repo and built.passed:  # never serve an engine that failed parity
        entry = triton_entry(bundle, triton_repo, max_batch=built.build.batch["max"])
    return EngineRun(built, written, entry)
