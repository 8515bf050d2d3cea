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

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporter import settings
from exporter.errors import CheckFailed, UserError
from exporter.fileio import publish_dir, sha256
from exporter.parity import ParityReport, compare_to_reference, reference_run
from exporter.source import LoadedModel, ModelSource, default_batch, load

FORMAT = "moe-export-bundle/1"
MANIFEST = "manifest.json"
PORTABLE, PLUGINS = "model.onnx", "model.plugins.onnx"
ENGINE = "model.engine"
INPUTS_NPZ, INPUTS_JSON, INPUTS_BIN = "inputs.npz", "inputs.json", "images.bin"
REFERENCE_NPZ, REFERENCE_JSON = "reference_outputs.npz", "reference_outputs.json"
NETWORK_SCRIPT = "polygraphy_network.py"
PTX_DIR = "ptx"
PACKAGES = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "triton", "numpy")


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


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is not a moe-export bundle (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / MANIFEST} is unreadable: {e}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is a bundle of format {manifest.get('format')!r}; this moe-export reads {FORMAT}")
    return manifest


def bundle_source(path: str | Path) -> ModelSource:
    return ModelSource.from_json(json.dumps(read_manifest(path)["model"]["source"]))


def _targets(targets) -> list[int]:
    out = []
    for t in targets:
        text = str(t).lower().removeprefix("sm_").removesuffix("a")
        if not text.isdigit() or not 50 <= int(text) <= 200:
            raise UserError(f"--target {t!r} is not a CUDA architecture like sm_87 or 90")
        out.append(int(text))
    return sorted(set(out))


def build_bundle(
    source: ModelSource,
    dest: str | Path,
    *,
    targets=settings.DEFAULT_PTX_TARGETS,
    ptx_version: int | None = None,
    batch: int | None = None,
    seed: int = settings.DEFAULT_SEED,
    opset: int = settings.DEFAULT_OPSET,
    step: Callable[[str], ContextManager] = lambda _: nullcontext(),
) -> BundleResult:
    """Model -> portable ONNX -> plugin ONNX -> CPU parity of both -> sample data, PTX, manifest, README.

    Args:
        source: The model (zoo config or user module).
        dest: The bundle folder. An existing bundle there is replaced; any other non-empty folder is refused.
        targets: CUDA architectures to precompile the plugin kernels for (87 = Orin, 90 = Hopper).
        ptx_version: PTX ISA version; default per target, the lowest it accepts and at least 8.5
            (``plugins.aot.ptx_version_for``: 8.5 for sm_87/sm_90, 9.0 for sm_110).
        batch: Images in the sample inputs (a multiple of the routing group); default one group.
        seed: Seed of the sample images.
        opset: ONNX opset of the export.
        step: Context-manager factory the CLI uses to show progress.

    Raises:
        CheckFailed: a graph does not match PyTorch on CPU (nothing is written).
    """
    from exporter.export import export_onnx
    from exporter.rewrite import rewrite_onnx
    from exporter.runners import run_onnxruntime
    from plugins.aot import PER_ARCH, ptx_version_for, target_unsupported

    start = time.perf_counter()
    dest = Path(dest)
    arches = _targets(targets)
    if targets is settings.DEFAULT_PTX_TARGETS:  # the defaults this Triton cannot compile are left out
        arches = [a for a in arches if a < 100 or target_unsupported(a) is None]
    for arch in arches:
        if arch >= 100 and (reason := target_unsupported(arch)):
            raise UserError(f"cannot precompile for sm_{arch}: {reason}")
    ptx_version = PER_ARCH if ptx_version is None else ptx_version
    try:
        for arch in arches:
            ptx_version_for(arch, ptx_version)
    except ValueError as e:
        raise UserError(str(e)) from None
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not is_bundle(dest))):
        raise UserError(f"{dest} exists and is not a moe-export bundle; choose another -o")
    _check_triton()
    with step(f"Building {source.name}"):
        loaded = load(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        export = export_onnx(loaded, tmp / PORTABLE, opset=opset, routing_outputs=True, step=step)
        rewritten = rewrite_onnx(tmp / PORTABLE, tmp / PLUGINS, seed=seed, step=step)
        headers = {name: onnx.load(str(tmp / name), load_external_data=False) for name in (PORTABLE, PLUGINS)}
        header = headers[PORTABLE]
        sample_batch = batch or _sample_batch(loaded)
        reference = reference_run(source, header, batch=sample_batch, seed=seed, step=step, loaded=loaded)
        model = {"family": loaded.family, "moe_layers": loaded.moe_layers, "batch_multiple": loaded.batch_multiple}
        del loaded  # big models: PyTorch's weights go before ONNX Runtime loads its own
        gc.collect()
        feeds = {reference.input_name: reference.images}
        parity: dict[str, ParityReport] = {}
        for name in (PORTABLE, PLUGINS):
            with step(f"Checking {name} against PyTorch (ONNX Runtime, CPU)"):
                actual = run_onnxruntime(tmp / name, feeds)
            parity[name] = compare_to_reference(
                reference,
                actual,
                headers[name],
                graph=name,
                backend="onnxruntime-cpu",
            )
        failed = [n for n, r in parity.items() if not r.passed]
        if failed:
            raise CheckFailed(f"{', '.join(failed)} of {source.name} do not match PyTorch on CPU; no bundle written")
        expected = reference.named_outputs(header)
        with step("Writing sample inputs and PyTorch's reference outputs"):
            _write_samples(tmp, feeds, expected)
        with step(f"Precompiling the plugin kernels to PTX for {', '.join(f'sm_{a}' for a in arches)}"):
            kernels = _precompile(tmp, arches, ptx_version, seed)
        _copy_plugin_package(tmp / "plugins")
        (tmp / NETWORK_SCRIPT).write_text(NETWORK_SCRIPT_TEXT)
        manifest = _manifest(header, source, model, export, rewritten, parity, expected, feeds, arches, ptx_version)
        manifest["plugins"]["ptx_kernels"] = kernels
        (tmp / "README.md").write_text(render_readme(manifest))
        manifest["files"] = _hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes = [f"{len(rewritten.declined)} MoE layers left as standard ONNX (see declined)"] if rewritten.declined else []
    return BundleResult(
        path=dest,
        model=source.name,
        seconds=time.perf_counter() - start,
        files=manifest["files"],
        parity={n: _parity_summary(r) for n, r in parity.items()},
        plugins=rewritten.counts,
        ptx_kernels=kernels,
        targets=[f"sm_{a}" for a in arches],
        declined=[d.to_dict() for d in rewritten.declined],
        notes=notes,
    )


def _sample_batch(loaded: LoadedModel) -> int:
    if loaded.batch_multiple > 1:
        return loaded.batch_multiple * settings.BUNDLE_SAMPLE_BATCHES
    return default_batch(loaded)


def _check_triton() -> None:
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise UserError("precompiling the plugin kernels needs Triton: pip install 'moe-export[plugins]'")


def _parity_summary(report: ParityReport) -> dict:
    return {
        "passed": report.passed,
        "backend": report.backend,
        "batch": report.batch,
        "max_rel_err": max((o.max_rel for o in report.outputs), default=0.0),
        "routing": report.routing_status,
        "routing_decisions": min((r.decisions for r in report.routing), default=None),
        "slot_swaps": sum(r.slot_swaps for r in report.routing),
    }


# --- sample data -----------------------------------------------------------------------------------


def _write_samples(folder: Path, feeds: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    from exporter.runners import quiet_polygraphy

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


# --- plugin kernels ----------------------------------------------------------------------------------


def plugin_node_shapes(path: Path, seed: int) -> list[tuple[str, dict, list[tuple[int, ...]]]]:
    """(op, attributes, input shapes) of every moe:: plugin node, measured in one ONNX Runtime run."""
    from exporter.rewrite import _probe
    from plugins import NAMESPACE, SPECS

    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.domain == NAMESPACE and n.op_type in SPECS]
    names = {t for n in nodes for t in n.input}
    if not nodes:
        return []
    full = onnx.load(str(path)) if not _external(proto) else proto
    values = _probe(path, full, names, seed)
    out = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out.append((node.op_type, attrs, [tuple(values[t].shape) for t in node.input]))
    return out


def _external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


COMPILE = """
import json, pickle, sys
from plugins.aot import compile_all
recipes, out, targets, ptx_version = pickle.load(open(sys.argv[1], "rb"))
compile_all(recipes, out, targets=targets, ptx_version=ptx_version)
"""


def _precompile(folder: Path, arches: list[int], ptx_version: int, seed: int) -> int:
    """PTX of every kernel variant the plugin graph's nodes need, per target; returns the variant count.

    Compiled in a child process: Triton cannot compile in a process that runs kernels in its
    interpreter (TRITON_INTERPRET=1, as the tests do), and a child keeps the compiler's memory apart.
    """
    import pickle

    from plugins.aot import node_recipes

    recipes = {}
    for op, attrs, shapes in plugin_node_shapes(folder / PLUGINS, seed):
        for recipe in node_recipes(op, shapes, attrs):
            recipes[recipe.key()] = recipe
    if not recipes:
        return 0
    job = folder / ".recipes.pkl"
    job.write_bytes(pickle.dumps((list(recipes.values()), str(folder / PTX_DIR), arches, ptx_version)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", COMPILE, str(job)], capture_output=True, text=True, env=env, timeout=1800
        )
    finally:
        job.unlink(missing_ok=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"Triton could not compile the plugin kernels to PTX: {last[:300]}")
    return len(recipes)


def _copy_plugin_package(dest: Path) -> None:
    """The ``plugins`` package's Python files (specs, references, kernels, TensorRT registrations)."""
    import plugins

    src = Path(plugins.__file__).parent
    for path in sorted(src.rglob("*.py")):
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


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


def _io(values: list[onnx.ValueInfoProto], initializers: set[str]) -> list[dict]:
    out = []
    for v in values:
        if v.name in initializers:
            continue
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append({"name": v.name, "dtype": dtype, "shape": dims})
    return out


def versions() -> dict[str, str | None]:
    out = {"moe-export": _version("moe-export"), "python": platform.python_version()}
    for package in PACKAGES:
        out[package] = _version(package)
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hashes(folder: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    return files


def _manifest(header, source, model, export, rewritten, parity, expected, feeds, arches, ptx_version) -> dict:
    from plugins import NAMESPACE
    from plugins.aot import ptx_version_for

    initializers = {i.name for i in header.graph.initializer}
    ((input_name, images),) = feeds.items()
    tolerances = {name: asdict(t) for name, t in settings.TOLERANCES.items()}
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": source.name,
            **model,
            "source": json.loads(source.to_json()),
        },
        "graphs": {
            "portable": {"file": PORTABLE, "opset": export.opset, "ops": sum(export.op_counts.values())},
            "plugins": {"file": PLUGINS, "plugin_nodes": rewritten.counts, "declined": len(rewritten.declined)},
        },
        "inputs": _io(list(header.graph.input), initializers),
        "preprocessing": settings.PREPROCESSING,
        "outputs": _io(list(header.graph.output), set()),
        "sample": {
            "batch": int(images.shape[0]),
            "seed": parity[PORTABLE].seed,
            "inputs": {"npz": INPUTS_NPZ, "polygraphy": INPUTS_JSON, "raw_float32": INPUTS_BIN},
            "reference_outputs": {"npz": REFERENCE_NPZ, "polygraphy": REFERENCE_JSON, "runner": "pytorch"},
        },
        "precision": settings.DEFAULT_PRECISION,
        "tolerances": tolerances,
        "polygraphy_atol": polygraphy_tolerances(expected, settings.FP32_TOLERANCES.rtol),
        "parity_cpu": {name: _parity_summary(r) for name, r in parity.items()},
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
    }


def _shape(name: str, batch: int, image: list) -> str:
    return f"{name}:{'x'.join(str(d) for d in [batch, *image])}"


def render_readme(manifest: dict) -> str:
    """The bundle's README: requirements, and the exact commands to build and check the engine."""
    model = manifest["model"]
    (inp,) = manifest["inputs"]
    image = inp["shape"][1:]
    batch = manifest["sample"]["batch"]
    group = model["batch_multiple"]
    atol = " ".join(f"{n}:{v:g}" for n, v in manifest["polygraphy_atol"].items())
    shapes = " ".join(f"--{k}Shapes={_shape(inp['name'], batch, image)}" for k in ("min", "opt", "max"))
    dims = ",".join(str(d) for d in [batch, *image])
    # Polygraphy builds a profile with every dynamic dimension at 1 unless told: the sample batch must fit
    trt_shapes = " ".join(f"--trt-{k}-shapes {inp['name']}:[{dims}]" for k in ("min", "opt", "max"))
    plugins = manifest["plugins"]
    counts = ", ".join(f"{n} {op}" for op, n in plugins["nodes"].items()) or "none"
    targets = ", ".join(plugins["ptx_targets"])
    return f"""# Deploy bundle: {model["name"]}

Made by moe-export {manifest["versions"]["moe-export"]} on {manifest["created"]}. Family: {model["family"]},
MoE layers: {", ".join(model["moe_layers"]) or "none"}.{
        f" The batch must be a multiple of {group} images (one V-MoE routing group)." if group > 1 else ""
    }
Inputs: {manifest["preprocessing"]}.

| file | what |
|---|---|
| `{PORTABLE}` | portable ONNX (opset {manifest["graphs"]["portable"]["opset"]}), standard ops only |
| `{PLUGINS}` | the same with moe:: plugin nodes ({counts}) |
| `plugins/`, `{PTX_DIR}/` | the plugin package and its kernels precompiled to PTX for {targets} |
| `{INPUTS_NPZ}`, `{INPUTS_JSON}`, `{INPUTS_BIN}` | {batch} sample images (.npz, Polygraphy JSON, raw float32) |
| `{REFERENCE_NPZ}`, `{REFERENCE_JSON}` | PyTorch's outputs on them, routing decisions included |
| `{MANIFEST}` | model, file hashes, inputs/outputs, tolerances, versions, CPU parity |

## Requirements

- **Plugin engine** (`{PLUGINS}`): TensorRT >= 10.9 with its Python package at build time (AOT Quickly
  Deployable Plugins). The built engine embeds the kernels and runs without Python (trtexec, C++, Triton
  Inference Server).
- **Portable engine** (`{PORTABLE}`): any TensorRT >= 10.3, no plugins.
- **Jetson**: JetPack 6.x (Orin, sm_87) ships TensorRT 10.3: the portable graph only. JetPack 7.x (Thor,
  sm_110) ships TensorRT 10.13 to 10.16: the plugin graph (its PTX is in `{PTX_DIR}/` when the bundle was
  made with Triton >= 3.9).
- **NumPy**: TensorRT 10.9 to 11.1 turn each integer plugin attribute into a Python int with `int(array)`,
  which NumPy >= 2.4 refuses, so no plugin node can be created: with those TensorRT versions use
  `pip install "numpy<2.4"`, or TensorRT >= 11.2. `moe-export build engine` checks this before building.
- Build the engine on the device that runs it (same GPU, JetPack and TensorRT).

Check the files first (every file's SHA-256 is in the manifest):

```bash
python3 - <<'EOF'
import hashlib, json
files = json.load(open("{MANIFEST}"))["files"]
bad = [f for f, v in files.items() if hashlib.sha256(open(f, "rb").read()).hexdigest() != v["sha256"]]
print(bad or "all files intact")
EOF
```

## With moe-export (on the device, from this folder's parent)

```bash
moe-export build engine {{this folder}} -o {{this folder}}    # registers the plugins, builds model.engine, validates it
moe-export validate {{this folder}}                        # TensorRT vs PyTorch: outputs and routing per layer
```

## With Polygraphy

```bash
# plugin graph: the script registers the plugins before parsing
PYTHONPATH=. MOE_PLUGINS_PTX_DIR={PTX_DIR} polygraphy run {NETWORK_SCRIPT} --trt {trt_shapes} \\
    --load-inputs {INPUTS_JSON} --load-outputs {REFERENCE_JSON} --rtol 0 --atol {atol}
# portable graph
polygraphy run {PORTABLE} --trt {trt_shapes} \\
    --load-inputs {INPUTS_JSON} --load-outputs {REFERENCE_JSON} --rtol 0 --atol {atol}
```

The `--trt-*-shapes` give the profile the sample batch (without them Polygraphy sets every dynamic
dimension to 1); Polygraphy leaves TF32 off unless `--tf32` is given.

The `--atol` values are the FP32 parity rule (max |TensorRT - PyTorch| <= {
        settings.FP32_TOLERANCES.rtol:g} x max |PyTorch|
per output), and 0 for routing decisions (expert, kept, slot), which must be identical.

## With plain trtexec (portable graph, no plugins)

```bash
trtexec --onnx={PORTABLE} {shapes} --noTF32 --saveEngine=model.portable.engine
trtexec --loadEngine=model.portable.engine --shapes={_shape(inp["name"], batch, image)} \\
    --loadInputs={inp["name"]}:{INPUTS_BIN} --exportOutput=outputs.json
```

`--noTF32`: trtexec allows TF32 by default, which misses the FP32 parity rule. trtexec cannot build
`{PLUGINS}` (its plugins are Python), but it runs the plugin engine that moe-export
or Polygraphy built: `trtexec --loadEngine={ENGINE} --shapes={_shape(inp["name"], batch, image)}`.
"""


# --- the engine of a bundle ----------------------------------------------------------------------------


@dataclass
class BundleEngine:
    """``build engine`` on a bundle: the build, and TensorRT's parity against PyTorch."""

    bundle: Path
    build: object  # exporter.engine.EngineBuild
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
    from exporter.engine import EngineOptions, build_engine, require_tensorrt
    from exporter.parity import validate_engine
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
    require_tensorrt(f"building the engine of {bundle}")
    os.environ.setdefault(PTX_DIR_ENV, str((bundle / PTX_DIR).resolve()))
    graph = bundle / (PORTABLE if portable else PLUGINS)
    build = build_engine(
        graph,
        bundle / ENGINE,
        options,
        batch_multiple=manifest["model"]["batch_multiple"],
        step=step,
        progress=progress,
    )
    parity = validate_engine(
        bundle / ENGINE,
        graph,
        tolerances=settings.TOLERANCES[options.precision],
        step=step,
        reference=stored_reference(bundle),
    )
    manifest["engine"] = {
        "file": ENGINE,
        "graph": graph.name,
        "precision": options.precision,
        "tensorrt": build.tensorrt,
        "batch": build.batch,
        "plugin_layers": build.plugin_layers,
        "parity": _parity_summary(parity),
    }
    manifest["files"] = _hashes(bundle)
    from exporter.fileio import write_json

    write_json(bundle / MANIFEST, manifest)
    return BundleEngine(bundle, build, parity)


def triton_entry(bundle: str | Path, repo: str | Path, *, max_batch: int | None = None, model_name: str | None = None):
    """A Triton Inference Server model-repository entry for a bundle's engine (``exporter.triton_repo``).

    Without an engine in the bundle the config is written alone (the entry is marked incomplete).
    """
    from exporter.triton_repo import IOSpec, write_triton_repo

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    engine = manifest.get("engine")
    group = manifest["model"]["batch_multiple"]
    if max_batch is None:
        max_batch = engine["batch"]["max"] if engine else manifest["sample"]["batch"]

    def spec(entry: dict) -> IOSpec:
        return IOSpec(entry["name"], entry["dtype"], [d if isinstance(d, int) else None for d in entry["shape"]])

    from exporter.export import ROUTING_PREFIX

    name = model_name or manifest["model"]["name"].replace("/", "_").replace(":", "_")
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
) -> BundleEngine:
    """``build engine`` on an exported ONNX file: ``out_dir/<stem>.engine``, validated against the
    model the graph records (Triton compiles plugin kernels on the spot: there is no precompiled PTX)."""
    from exporter.engine import EngineOptions, build_engine, require_tensorrt
    from exporter.parity import validate_engine
    from exporter.runners import read_onnx_header

    graph = Path(graph)
    header = read_onnx_header(graph)
    options = options or EngineOptions()
    options.check()
    require_tensorrt(f"building an engine from {graph}")
    dim = header.graph.input[0].type.tensor_type.shape.dim[0]
    group = int(dim.dim_param.split("*")[0]) if "*" in dim.dim_param else 1
    engine = Path(out_dir) / f"{graph.stem}.engine"
    build = build_engine(graph, engine, options, batch_multiple=group, step=step, progress=progress)
    parity = validate_engine(engine, graph, tolerances=settings.TOLERANCES[options.precision], step=step)
    return BundleEngine(Path(out_dir), build, parity)


def resolve_engine(path: str | Path, graph: str | Path | None = None) -> tuple[Path, Path, Path | None, str | None]:
    """(engine, the ONNX graph it was built from, sample inputs or None, precision or None) for a
    bundle folder or an engine file (its graph from ``graph`` or from a bundle manifest beside it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = read_manifest(folder) if is_bundle(folder) else None
    if path.is_dir():
        if manifest is None:
            raise UserError(f"{path} is not a moe-export bundle (no {MANIFEST})")
        if not manifest.get("engine") or not (path / ENGINE).is_file():
            raise UserError(f"{path} has no engine yet: build it with `moe-export build engine {path}`")
        engine = path / ENGINE
    elif path.is_file():
        engine = path
    else:
        raise UserError(f"{path} does not exist")
    built = (manifest or {}).get("engine") or {}
    if graph is None and manifest is not None and engine.name == ENGINE:
        graph = folder / built.get("graph", PLUGINS)
    if graph is None:
        raise UserError(f"give --onnx GRAPH: the ONNX graph {engine.name} was built from")
    inputs = folder / INPUTS_NPZ if manifest is not None else None
    return engine, Path(graph), inputs, built.get("precision")


def stored_reference(bundle: str | Path):
    """PyTorch's outputs and routing on the sample inputs, as the bundle stores them: validation on the
    target needs neither the model's code nor its checkpoint. Both files are checked against the
    manifest's hashes first."""
    import torch

    from exporter.export import ROUTING_LAYERS_KEY, ROUTING_PREFIX, routing_output_names
    from exporter.parity import Reference
    from exporter.routing import TopKRouting

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for name in (INPUTS_NPZ, REFERENCE_NPZ):
        want = manifest["files"].get(name, {}).get("sha256")
        if not (bundle / name).is_file() or sha256(bundle / name) != want:
            raise UserError(f"{bundle / name} is missing or changed since the bundle was built (SHA-256 mismatch)")
    header = onnx.load(str(bundle / PORTABLE), load_external_data=False)
    with np.load(bundle / INPUTS_NPZ) as data:
        ((input_name, images),) = data.items()
    with np.load(bundle / REFERENCE_NPZ) as data:
        stored = dict(data.items())
    plain = [o.name for o in header.graph.output if not o.name.startswith(ROUTING_PREFIX)]
    layers = json.loads({p.key: p.value for p in header.metadata_props}.get(ROUTING_LAYERS_KEY, "[]"))
    routing = {}
    for layer in layers:
        expert, _, slot = routing_output_names(layer)
        e, s = torch.from_numpy(stored[expert]), torch.from_numpy(stored[slot])
        routing[layer] = TopKRouting(e, s, torch.zeros(e.shape))  # weights are not compared
    return Reference(
        model=manifest["model"]["name"],
        input_name=input_name,
        images=images,
        outputs=[stored[n] for n in plain],
        routing=routing,
        seed=manifest["sample"]["seed"],
        stored=f"PyTorch outputs stored in {bundle.name} when it was built ({manifest['created']})",
    )
