"""Deploy bundles: everything an edge GPU needs to build a TensorRT engine and check it, made on CPU.

A bundle folder holds::

    model.onnx                 portable graph (standard ops; routing outputs per V-MoE layer)
    model.plugins.onnx         the same with moe:: plugin nodes (AOT Quickly Deployable Plugins)
    plugins/                   the plugin package: specs, Triton kernels, TensorRT registrations
    ptx/                       the kernels precompiled to PTX per --target (plus ptx/manifest.json)
    inputs.npz, inputs.json    sample inputs (.npz, and Polygraphy's JSON for --load-inputs)
    images.bin                 the same images as raw float32, for trtexec --loadInputs
    reference_outputs.npz      PyTorch's outputs on them (routing included) ...
    reference_outputs.json     ... and as Polygraphy RunResults for --load-outputs
    polygraphy_network.py      registers the plugins, then parses model.plugins.onnx (polygraphy run)
    manifest.json              model, files with hashes, I/O, tolerances, versions, CPU parity
    README.md                  the commands to build and check the engine on the target

The folder is assembled beside the destination and moved into place when complete: an interrupted
build leaves the previous bundle (or nothing), never half of one.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporter import settings
from exporter.deploy import ptx
from exporter.deploy.readme import render_readme
from exporter.errors import CheckFailed, UserError
from exporter.export.export import ExportResult, export_onnx, graph_bytes
from exporter.export.precision import check_precision, check_quantized_targets
from exporter.fileio import check_output, check_replaceable, check_space, publish_dir, temp_dir
from exporter.formats.bundle import (
    FORMAT,
    INPUTS_BIN,
    INPUTS_JSON,
    INPUTS_NPZ,
    MANIFEST,
    NETWORK_SCRIPT,
    PLUGINS,
    PORTABLE,
    PTX_DIR,
    README,
    REFERENCE_JSON,
    REFERENCE_NPZ,
    SIGNATURE,
    SIGNATURE_ALGORITHM,
    bundle_listing,
    hashes,
    read_manifest,
    signed_payload,
)
from exporter.formats.graph import SOURCE_KEY, input_dims, metadata, read_header, routing_layers, vmoe_layers
from exporter.formats.graph import precision as precision_of
from exporter.parity.parity import ParityReport, onnx_parity, reference_run
from exporter.progress import phase
from exporter.rewrite.plan import RewriteResult
from exporter.rewrite.rewrite import rewrite_onnx
from exporter.sources.loading import ModelSource, load
from exporter.versions import versions
from plugins.aot import PER_ARCH, ptx_version_for
from plugins.spec import NAMESPACE

log = logging.getLogger(__name__)


class ParityFailed(CheckFailed):
    """A graph of the bundle does not match PyTorch on CPU; ``reports`` holds the failed graphs' reports."""

    def __init__(self, message: str, reports: dict[str, ParityReport]):
        super().__init__(message)
        self.reports = reports


@dataclass
class BundleResult:
    path: Path
    model: str
    seconds: float
    files: dict[str, dict]
    parity: dict[str, dict]
    plugins: dict[str, int]
    ptx_kernels: int
    targets: list[str]
    precision: str = settings.DEFAULT_PRECISION
    declined: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p["passed"] for p in self.parity.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["passed"] = self.passed
        return d


def bundle_source(path: str | Path) -> ModelSource:
    """The model a bundle records (its file paths are relative to the bundle folder)."""
    return ModelSource.from_json(json.dumps(read_manifest(path)["model"]["source"])).anchored(path)


def build_bundle(
    source: ModelSource,
    dest: str | Path,
    *,
    targets=None,
    ptx_version: int | None = None,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    opset: int = settings.DEFAULT_OPSET,
    precision: str = settings.DEFAULT_PRECISION,
    sign_key: str | Path | None = None,
    graphs: tuple[ExportResult, RewriteResult] | None = None,
) -> BundleResult:
    """Model -> portable ONNX -> plugin ONNX -> CPU parity of both -> sample data, PTX, manifest, README.

    Args:
        source: The model (``exporter.from_zoo``, ``from_module``, ...).
        dest: The bundle folder. An existing bundle there is replaced if it holds only its own files; any
            other non-empty folder, the working folder and its parents are refused (``check_replaceable``).
        targets: CUDA architectures to precompile the plugin kernels for (87 = Orin, 90 = Hopper);
            default ``settings.DEFAULT_PTX_TARGETS`` less those this Triton cannot compile.
        ptx_version: PTX ISA version; default per target, the lowest it accepts and at least 8.5
            (``plugins.aot.ptx_version_for``: 8.5 for sm_87/sm_90, 9.0 for sm_110).
        batch: Images in the sample inputs (a multiple of the routing group); default one group.
        seed: Seed of the sample images.
        opset: ONNX opset of the export.
        precision: ``fp32``, ``fp16`` or ``bf16``: both graphs in it, the routing in FP32, checked on CPU
            with its tolerances (the engine is built from them strongly typed).
        sign_key: An Ed25519 private key (PEM; ``moe-export keygen``): the manifest is signed
            (``manifest.sig``), and ``validate``/``build engine --verify-key`` check it on the target.
        graphs: This model's portable graph (routing outputs, ``precision``, ``opset``) and its rewrite,
            taken as they are rather than made again (the demo's; not with weights in a ``.data`` file).

    Raises:
        ParityFailed: a graph does not match PyTorch on CPU (nothing written): a CheckFailed naming the
            worst mismatch, with each failed graph's report.
    """
    start = time.perf_counter()
    dest, arches, ptx_version, signer = _check_request(dest, targets, ptx_version, precision, sign_key)
    loaded = _load(source, dest)
    with temp_dir(dest) as tmp:
        export, rewritten = _graphs(source, loaded, graphs, dest, tmp, opset=opset, precision=precision, seed=seed)
        headers = {name: read_header(tmp / name) for name in (PORTABLE, PLUGINS)}
        sample_batch = batch or settings.default_batch(loaded.batch_multiple, "bundle")
        # (the plugin graph's header: its TopKRoute nodes say how other authors' layers route)
        reference = reference_run(source, headers[PLUGINS], batch=sample_batch, seed=seed, loaded=loaded)
        model = {"family": loaded.family, "moe_layers": loaded.moe_layers, "batch_multiple": loaded.batch_multiple}
        del loaded  # big models: PyTorch's weights go before ONNX Runtime loads its own
        gc.collect()
        parity = _parity(reference, tmp, headers, precision, source.name)
        graphs = (headers[PORTABLE], export, rewritten, parity)
        manifest = _write_contents(tmp, source.relative_to(dest), model, reference, graphs, arches, ptx_version, seed)
        _finish_manifest(tmp, manifest, signer)
        publish_dir(tmp, dest)
    return BundleResult(
        path=dest,
        model=source.name,
        seconds=time.perf_counter() - start,
        files=manifest["files"],
        parity={n: r.summary() for n, r in parity.items()},
        plugins=rewritten.counts,
        ptx_kernels=manifest["plugins"]["ptx_kernels"],
        targets=[f"sm_{a}" for a in arches],
        precision=precision,
        declined=[d.to_dict() for d in rewritten.declined],
        notes=[f"{len(rewritten.declined)} MoE layers left as standard ONNX (see declined)"]
        if rewritten.declined
        else [],
    )


def _graphs(source, loaded, graphs, dest: Path, tmp: Path, *, opset: int, precision: str, seed: int):
    """The portable graph and its rewrite in ``tmp``: the ones given when they fit (``_take_graphs``),
    else exported and rewritten here."""
    if graphs is not None and _take_graphs(graphs, source, dest, tmp, opset=opset, precision=precision):
        return graphs
    export = export_onnx(loaded, tmp / PORTABLE, opset=opset, routing_outputs=True, precision=precision)
    return export, rewrite_onnx(tmp / PORTABLE, tmp / PLUGINS, seed=seed)


def _load(source: ModelSource, dest: Path):
    """The model, and room for the portable and the plugin graph (each with the weights), samples, PTX
    and the plugin package."""
    with phase(log, f"Building {source.name}"):
        loaded = load(source)
    check_space(dest, 2 * graph_bytes(loaded.module) + (16 << 20), "the bundle")
    return loaded


def _check_request(dest, targets, ptx_version, precision: str, sign_key):
    """Everything checked before any work: the precision, the folder (replaced only if it holds a bundle
    of ours), the targets and their PTX versions, the signing key, Triton. ``(dest, arches, ptx_version,
    signer or None)``."""
    check_precision(precision)
    dest = check_output(dest, folder=True)
    arches = ptx.default_targets() if targets is None else ptx.parse_targets(targets)
    check_quantized_targets(precision, arches, "a bundle")
    if precision in settings.QUANTIZED_PRECISIONS + settings.WEIGHT_ONLY_PRECISIONS:
        raise UserError(
            f"build bundle does not make {precision} bundles yet (no `calibration` here; their plugin kernels are "
            f"untested): export `precision={precision}` `calibration=FILE.npz|DIR`, rewrite it, and build its graph "
            "(build engine GRAPH.onnx `backend=tensorrt-rtx` `target=sm_89`)"
        )
    ptx_version = PER_ARCH if ptx_version is None else ptx_version
    try:
        for arch in arches:
            ptx_version_for(arch, ptx_version)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_replaceable(dest, bundle_listing(dest), "bundle")
    _created()  # a bad SOURCE_DATE_EPOCH fails before the work
    signer = None
    if sign_key is not None:  # a key that does not load fails now
        from exporter.formats.signing import load_private_key

        signer = load_private_key(sign_key)
    ptx.check_triton()
    return dest, arches, ptx_version, signer


def _parity(reference, tmp: Path, headers: dict, precision: str, model: str) -> dict[str, ParityReport]:
    """Both graphs against PyTorch on CPU with the precision's tolerances; ParityFailed (nothing written)
    naming the worst mismatch of each that fails."""
    parity: dict[str, ParityReport] = {}
    for name in (PORTABLE, PLUGINS):
        parity[name] = onnx_parity(
            reference,
            tmp / name,
            headers[name],
            graph=name,
            tolerances=settings.TOLERANCES[precision],
            doing=f"Checking {name} against PyTorch (ONNX Runtime, CPU)",
        )
    if failed := {n: r for n, r in parity.items() if not r.passed}:
        why = "; ".join(f"{n}: {r.worst()}" for n, r in failed.items())
        raise ParityFailed(
            f"{', '.join(failed)} of {model} do not match PyTorch on CPU ({why}); no bundle written", failed
        )
    return parity


def _write_contents(tmp: Path, recorded, model: dict, reference, graphs, arches, ptx_version, seed: int) -> dict:
    """The samples and PyTorch's outputs, the PTX, the plugin package, Polygraphy's network script and
    the README into ``tmp``; returns the manifest (without the files' hashes yet)."""
    header, export, rewritten, parity = graphs
    expected = reference.named_outputs(header)
    feeds = {reference.input_name: reference.images}
    with phase(log, "Writing sample inputs and PyTorch's reference outputs"):
        _write_samples(tmp, feeds, expected)
    with phase(log, f"Precompiling the plugin kernels to PTX for {', '.join(f'sm_{a}' for a in arches)}"):
        kernels = ptx.precompile(tmp, arches, ptx_version, seed)
    ptx.copy_plugin_package(tmp / "plugins")
    (tmp / NETWORK_SCRIPT).write_text(NETWORK_SCRIPT_TEXT)
    manifest = _manifest(header, recorded, model, export, rewritten, parity, expected, feeds, arches, ptx_version)
    manifest["plugins"]["ptx_kernels"] = kernels
    (tmp / README).write_text(render_readme(manifest))
    return manifest


def _finish_manifest(tmp: Path, manifest: dict, signer) -> None:
    """Every file's hash into the manifest, its signature (with a key), then the manifest itself."""
    manifest["files"] = hashes(tmp)
    if signer is not None:
        from exporter.formats.signing import key_id, sign

        manifest["signature"] = {
            "file": SIGNATURE,
            "algorithm": SIGNATURE_ALGORITHM,
            "public_key_sha256": key_id(signer.public_key()),
        }
        (tmp / SIGNATURE).write_bytes(sign(signed_payload(manifest), signer))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _take_graphs(
    graphs: tuple[ExportResult, RewriteResult],
    source: ModelSource,
    dest: Path,
    tmp: Path,
    *,
    opset: int,
    precision: str,
) -> bool:
    """Copies an export of ``source`` and its rewrite into the bundle being assembled in ``tmp``, their
    recorded model anchored at ``dest``; False (nothing copied) for graphs with their weights in a
    ``.data`` file. A user error for graphs of another model, precision or opset, or without routing outputs."""
    export, rewritten = graphs
    if rewritten.path is None or Path(rewritten.source) != Path(export.path):
        raise UserError(f"{rewritten.path or 'the rewrite'} is not the rewrite of {export.path}")
    paths = (Path(export.path), Path(rewritten.path))
    if any(p.with_name(p.name + ".data").exists() for p in paths):
        return False
    headers = [read_header(p) for p in paths]
    routing = routing_layers(headers[0]) or not vmoe_layers(headers[0])
    if export.opset != opset or precision_of(headers[0])[0] != precision or not routing:
        raise UserError(
            f"{paths[0]} is not a bundle's graph: export it at opset {opset} in {precision} with `routing_outputs=True`"
        )
    for path, header in zip(paths, headers):
        recorded = metadata(header).get(SOURCE_KEY)
        if recorded != source.relative_to(path.parent).to_json():
            raise UserError(f"{path} was not exported from {source.name} as the bundle builds it")
    anchored = source.relative_to(dest).to_json()
    for path, name in zip(paths, (PORTABLE, PLUGINS)):
        if anchored == source.relative_to(path.parent).to_json():
            shutil.copyfile(path, tmp / name)
        else:  # file paths the graph records are relative to the graph's folder
            proto = onnx.load(str(path))
            onnx.helper.set_model_props(proto, {**metadata(proto), SOURCE_KEY: anchored})
            onnx.save(proto, str(tmp / name))
    return True


# --- sample data -----------------------------------------------------------------------------------


def _write_samples(folder: Path, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    from exporter.backends.tensorrt import quiet_polygraphy

    np.savez(folder / INPUTS_NPZ, **feeds)
    np.savez(folder / REFERENCE_NPZ, **expected)
    (images,) = feeds.values()
    np.ascontiguousarray(images, dtype=np.float32).tofile(folder / INPUTS_BIN)
    with quiet_polygraphy():
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json

        save_json([feeds], str(folder / INPUTS_JSON), description="sample inputs")
        results = RunResults([("pytorch", [IterationResult(expected, runner_name="pytorch")])])
        results.save(str(folder / REFERENCE_JSON))


def polygraphy_tolerances(expected: dict[str, np.ndarray], rtol: float) -> dict[str, float]:
    """Per-output absolute tolerances that make Polygraphy's elementwise check (with ``--rtol 0``) the
    parity check: floats within ``rtol`` of the output's scale, integer and bool outputs exact."""
    out = {}
    for name, value in expected.items():
        if np.issubdtype(value.dtype, np.floating):
            bound = rtol * (float(np.max(np.abs(value))) if value.size else 0.0)
            short = float(f"{bound:.3g}")
            out[name] = short if short >= bound else float(f"{bound * 1.001:.3g}")  # round up, never tighter
        else:
            out[name] = 0.0
    return out


NETWORK_SCRIPT_TEXT = '''"""For `polygraphy run polygraphy_network.py --trt ...`: registers the moe:: plugins,
then parses model.plugins.onnx. Polygraphy's --plugins flag loads shared libraries only, so Python
plugins are registered here. Run from the bundle folder with PYTHONPATH=. and MOE_PLUGINS_PTX_DIR=ptx."""

from pathlib import Path

from polygraphy.backend.trt import NetworkFromOnnxPath

from plugins.register import register_all

register_all()
load_network = NetworkFromOnnxPath(str(Path(__file__).with_name("model.plugins.onnx")), strongly_typed=True)
'''


# --- manifest and README ---------------------------------------------------------------------------


def _created() -> str:
    """The build's time (UTC), or that of ``SOURCE_DATE_EPOCH`` (reproducible builds) when set."""
    epoch = os.environ.get(settings.REPRODUCIBLE_TIME_ENV)
    if epoch is None:
        when = datetime.datetime.now(datetime.timezone.utc)
    else:
        try:
            when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise UserError(f"{settings.REPRODUCIBLE_TIME_ENV}={epoch!r} is not a time in seconds since 1970") from None
    return when.isoformat(timespec="seconds")


def _io(values: list[onnx.ValueInfoProto], initializers: set[str]) -> list[dict]:
    return [
        {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": input_dims(v),
        }
        for v in values
        if v.name not in initializers
    ]


def _manifest(header, source, model, export, rewritten, parity, expected, feeds, arches, ptx_version) -> dict:
    initializers = {i.name for i in header.graph.initializer}
    ((input_name, images),) = feeds.items()
    tolerances = {name: asdict(t) for name, t in settings.TOLERANCES.items()}
    return {
        "format": FORMAT,
        "created": _created(),
        # what differs between two builds of one model from two checkouts (with SOURCE_DATE_EPOCH: nothing)
        "reproducible_except": ["created"] if settings.REPRODUCIBLE_TIME_ENV not in os.environ else [],
        "model": {
            "name": source.name,
            **model,
            "source": json.loads(source.to_json()),
        },
        "graphs": {
            "portable": {
                "file": PORTABLE,
                "opset": export.opset,
                "ops": sum(export.op_counts.values()),
                "casts": export.casts,
                "fp32_nodes": export.fp32_nodes,
            },
            "plugins": {"file": PLUGINS, "plugin_nodes": rewritten.counts, "declined": len(rewritten.declined)},
        },
        "inputs": _io(list(header.graph.input), initializers),
        "preprocessing": source.preprocessing,
        "outputs": _io(list(header.graph.output), set()),
        "sample": {
            "batch": int(images.shape[0]),
            "seed": parity[PORTABLE].seed,
            "inputs": {"npz": INPUTS_NPZ, "polygraphy": INPUTS_JSON, "raw_float32": INPUTS_BIN},
            "reference_outputs": {"npz": REFERENCE_NPZ, "polygraphy": REFERENCE_JSON, "runner": "pytorch"},
        },
        "precision": export.precision,
        "routing_precision": export.routing_precision,
        "tolerances": tolerances,
        "polygraphy_atol": polygraphy_tolerances(expected, settings.TOLERANCES[export.precision].rtol),
        "parity_cpu": {name: r.summary() for name, r in parity.items()},
        "plugins": {
            "namespace": NAMESPACE,
            "nodes": rewritten.counts,
            "package": "plugins/",
            "ptx_dir": f"{PTX_DIR}/",
            "ptx_targets": [f"sm_{a}" for a in arches],
            "ptx_version": {f"sm_{a}": ptx_version_for(a, ptx_version) for a in arches},
        },
        "requirements": {
            "plugin_engine": "TensorRT >= 10.9 (AOT Quickly Deployable Plugins) and Python with tensorrt at build time",
            "portable_engine": "TensorRT >= 10.3 (JetPack 6); no plugins",
            "engine_runtime": "an AOT plugin engine runs without Python (trtexec, C++, Triton's TensorRT backend)",
        },
        "versions": versions(),
        "engine": None,
        "signature": None,  # build bundle --sign-key: {file, algorithm, public_key_sha256}
    }
