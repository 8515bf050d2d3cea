"""TensorRT engines of bundles and graphs: build, check the plugin layers, validate, record in the
manifest; and a Triton Inference Server entry for a bundle's engine."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exporter import settings
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
from exporter.sources.choice import ModelChoice

if TYPE_CHECKING:  # parity imports torch: only once TensorRT is known to be here (a refusal is instant)
    from exporter.parity.parity import ParityReport


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
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
    progress: Callable[[str], None] = lambda _: None,
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
            step=step,
            progress=progress,
        )
        parity = validate_engine(
            new_engine,
            graph,
            tolerances=settings.TOLERANCES[build.precision],
            step=step,
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
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
    progress: Callable[[str], None] = lambda _: None,
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
    build = build_engine(graph, engine, options, batch_multiple=group, step=step, progress=progress)
    parity = validate_engine(
        engine, graph, tolerances=settings.TOLERANCES[build.precision], step=step, trust_module=trust_module
    )
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


def build_engine_for(
    source_path: str | Path | None = None,
    model: ModelChoice = ModelChoice(),
    *,
    output_dir: str | Path | None = None,
    options=None,
    portable: bool = False,
    targets=None,
    triton_repo: str | Path | None = None,
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
    progress: Callable[[str], None] = lambda _: None,
    bundle_written: Callable[[object], None] = lambda result: None,
    verify_key: str | Path | None = None,
    trust_module: bool = False,
) -> EngineRun:
    """What ``moe-export build engine`` does, from a bundle folder, an exported .onnx (the engine goes
    to ``output_dir``) or a model (``model`` names one: the bundle is written to ``output_dir`` first,
    on CPU, and ``bundle_written`` is called with it). With ``triton_repo``, an engine that passed
    parity also gets a Triton Inference Server entry. ``verify_key`` (a bundle): its Ed25519
    signature is checked first. ``trust_module`` (an .onnx): the user module it records may be imported.

    Raises:
        TensorRTUnavailable: no TensorRT or GPU here; a bundle written first is kept and complete.
    """
    from exporter.backends.tensorrt import EngineOptions, TensorRTUnavailable

    options = options or EngineOptions()
    options.check()
    if triton_repo and source_path and not is_bundle(source_path):
        raise UserError("--triton-repo needs a bundle (its manifest names the inputs and outputs)")
    written, notes = None, []
    if verify_key is not None and not (source_path and is_bundle(source_path)):
        raise UserError("--verify-key checks a bundle's signature: give the bundle folder")
    if model.model or model.module:
        if source_path:
            raise UserError("give a bundle folder or --model/--module, not both")
        if not output_dir:
            raise UserError("give -o DIR: the bundle folder to write")
        from exporter.deploy.bundle import build_bundle

        precision = options.precision or settings.DEFAULT_PRECISION
        written = build_bundle(model, output_dir, targets=targets, precision=precision, step=step)
        bundle_written(written)
        bundle = Path(output_dir)
    elif source_path and is_bundle(source_path):
        bundle = Path(source_path)
        _, notes = open_bundle(bundle, verify_key)  # the signature, every file, what is unlisted
        if output_dir and Path(output_dir).resolve() != bundle.resolve():
            bundle = copy_bundle(bundle, output_dir)  # the listed files only, links never followed
    elif source_path and Path(source_path).suffix == ".onnx":
        if not output_dir:
            raise UserError("give -o DIR: the folder for the engine")
        return EngineRun(
            build_onnx_engine(source_path, output_dir, options, step=step, progress=progress, trust_module=trust_module)
        )
    elif source_path:
        raise UserError(f"{source_path} is neither a moe-export bundle nor an .onnx file")
    else:
        raise UserError("give a bundle folder, or --model NAME / --module FILE.py:FACTORY with -o DIR")
    try:
        built = build_bundle_engine(bundle, options, portable=portable, step=step, progress=progress)
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(f"{e}. The bundle in {bundle} is complete: build its engine on the target") from None
    built.parity.notes += notes
    entry = None
    if triton_repo and built.passed:  # never serve an engine that failed parity
        entry = triton_entry(bundle, triton_repo, max_batch=built.build.batch["max"])
    return EngineRun(built, written, entry)
