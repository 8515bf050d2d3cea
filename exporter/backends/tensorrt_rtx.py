"""TensorRT for RTX: engines for GeForce RTX / RTX PRO GPUs, built on any machine, GPU or not.

The only exporter module that imports ``tensorrt_rtx``, always inside functions. A build names its
targets (compute capabilities: ``sm_89`` and so on) instead of using the GPU at hand, so the real
parser and builder run on a CPU-only machine; only running an engine needs the GPU it was built for.

Builds run in a child process (``python -m exporter.backends.tensorrt_rtx``): the RTX ONNX parser
opens ``libtensorrt_rtx.so`` by that name to create plugins, and the pip wheel ships only
``libtensorrt_rtx.so.1`` (1.7.1), so the child gets a folder holding that name on its
``LD_LIBRARY_PATH`` (the dynamic loader reads it at process start). The child also keeps a native
abort or the out-of-memory killer from taking the command down with it: either is one line.

The moe:: plugins are registered as ``IPluginV3`` classes (``plugins.v3``): the RTX parser refuses
the Quickly Deployable Plugins that full TensorRT uses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporter import settings
from exporter.backends.runner import Runner
from exporter.errors import CheckFailed, UserError, one_line
from exporter.progress import OncePerPhase
from exporter.settings import Precision

log = logging.getLogger(__name__)

BACKEND = "tensorrt-rtx"
PACKAGE = "tensorrt-rtx-cu12"
INSTALL_HINT = f"pip install {PACKAGE} (its Builder and ONNX parser need no GPU)"
#: The compute capabilities TensorRT for RTX 1.7 builds for (``trt.ComputeCapability``).
TARGETS = {75: "SM75", 80: "SM80", 86: "SM86", 89: "SM89", 120: "SM120", 121: "SM121"}
#: Targets it does not offer, and what builds for them instead.
ELSEWHERE = {
    87: "Jetson Orin: build with `backend=tensorrt` on the device (JetPack's TensorRT)",
    90: "Hopper (H100/H200): build with `backend=tensorrt` (TensorRT >= 10.9)",
    100: "Blackwell data-center GPUs: build with `backend=tensorrt`",
    103: "Blackwell data-center GPUs: build with `backend=tensorrt`",
    110: "Jetson Thor: build with `backend=tensorrt` on the device (JetPack 7's TensorRT)",
}
#: What the report and the last line say of an engine built where no GPU of its target is.
NOT_RUN = "not run: no GPU of its target here"


class RTXUnavailable(UserError):
    """TensorRT for RTX is not installed or does not import (exit code 2)."""


def _installed() -> bool:
    try:
        return importlib.util.find_spec("tensorrt_rtx") is not None
    except (ImportError, ValueError):
        return False


def rtx_available() -> str | None:
    """None when TensorRT for RTX imports here, else why not in a few words (no GPU needed)."""
    if not _installed():
        return "TensorRT for RTX is not installed"
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception as e:  # the libraries behind the bindings missing
        return f"TensorRT for RTX does not import ({one_line(e, 140)})"
    return None


def require_rtx(doing: str) -> None:
    reason = rtx_available()
    if reason is not None:
        raise RTXUnavailable(f"{doing} needs TensorRT for RTX: {reason}; {INSTALL_HINT}")


def parse_targets(targets) -> list[int]:
    """``["sm_89", "120"]`` -> ``[89, 120]``: each one TensorRT for RTX builds for, or one line saying
    which backend builds it (sm_87, sm_90, sm_110) or which targets there are."""
    arches = []
    for target in targets:
        match = re.fullmatch(r"(?:sm_?)?(\d+)a?", str(target).strip().lower())
        if not match:
            raise UserError(f"target {target!r} is not a CUDA architecture like sm_89")
        arch = int(match.group(1))
        if arch in ELSEWHERE:
            raise UserError(f"TensorRT for RTX cannot build for sm_{arch} ({ELSEWHERE[arch]})")
        if arch not in TARGETS:
            known = ", ".join(f"sm_{a}" for a in TARGETS)
            raise UserError(f"TensorRT for RTX cannot build for sm_{arch}; its targets are {known}")
        if arch not in arches:
            arches.append(arch)
    if not arches:
        raise UserError(f"give `target`: the RTX GPUs to build for ({', '.join(f'sm_{a}' for a in TARGETS)})")
    return arches


def check_targets(targets) -> list[int]:
    """The targets (:func:`parse_targets`) once TensorRT for RTX is known to be here: what ``build
    engine --backend tensorrt-rtx`` checks first, in one line each, before any heavy import."""
    arches = parse_targets(targets or [])
    require_rtx("building the engine")
    return arches


def gpu_arch() -> int | None:
    """The compute capability of this machine's first CUDA GPU (``major*10 + minor``), or None when
    there is none (or no driver). Asks the CUDA driver through cuda-python: no torch."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    try:
        (error,) = driver.cuInit(0)
        if error != driver.CUresult.CUDA_SUCCESS:
            return None
        error, device = driver.cuDeviceGet(0)
        if error != driver.CUresult.CUDA_SUCCESS:
            return None
        attribute = driver.CUdevice_attribute
        _, major = driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
        _, minor = driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    except Exception:  # a driver library that fails to load
        return None
    return major * 10 + minor


# --- the parser's word on a graph ------------------------------------------------------------------------


@dataclass
class ParseReport:
    """What TensorRT for RTX's ONNX parser says of a graph: ``parsed``, its errors (node, op, message),
    and the layers of the network it made, by type."""

    parsed: bool
    version: str
    errors: list[dict] = field(default_factory=list)
    layers: int = 0
    layer_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_graph(graph) -> ParseReport:
    """Parses an ONNX graph (a path, or a ModelProto whose weights are in memory) with TensorRT for
    RTX into a strongly typed network. Plugin nodes are not registered here: for a plugin graph use
    :func:`build_engine`, whose child process can create the plugins."""
    require_rtx("parsing with TensorRT for RTX")
    import tensorrt_rtx as trt

    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    with _quiet_native():
        if isinstance(graph, (str, Path)):
            parsed = parser.parse_from_file(str(graph))
        else:
            parsed = parser.parse(graph.SerializeToString())
    errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    types = Counter(str(layer.type).rsplit(".", 1)[-1] for layer in _layers(network))
    return ParseReport(bool(parsed) and not errors, trt.__version__, errors, network.num_layers, dict(types))


def parse_structure(path: str | Path) -> ParseReport:
    """:func:`parse_graph` of a graph file's structure: its weights (initializers of more than
    ``SMALL_CONSTANT`` elements) become typed graph inputs, so a multi-GB model parses in seconds
    without its weights in memory; shapes, axes and scalars stay values, as the parser reads them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    kept = []
    for tensor in graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        if count <= SMALL_CONSTANT and tensor.data_location != onnx.TensorProto.EXTERNAL:
            kept.append(tensor)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return parse_graph(model)


SMALL_CONSTANT = 64  # elements: an initializer up to this size is a value the parser may need (a shape)


def _parser_error(error) -> dict:
    return {
        "node": error.node_name(),
        "op": error.node_operator(),
        "message": one_line(RuntimeError(error.desc()), 300),
    }


def _layers(network):
    return (network.get_layer(i) for i in range(network.num_layers))


@contextlib.contextmanager
def _quiet_native():
    """The parser prints CUDA's "driver version is insufficient" to stderr on machines without a GPU,
    from native code: file descriptor 2 goes to /dev/null for the block (the logger keeps errors)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _Logger(trt):  # noqa: N802 (a class made for the module at hand)
    class Logger(trt.ILogger):
        """Keeps errors for the one line a failure shows; everything else is dropped."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return Logger()


# --- building ------------------------------------------------------------------------------------------


@dataclass
class RTXEngineBuild:
    """One engine for one target: the file, its size and build time, the plugin layers of the parsed
    network (per plugin op) against the graph's plugin nodes, and the layers that compute in FP32 in
    a reduced-precision graph (None for an FP32 graph: all of them do)."""

    path: Path
    onnx: Path
    target: str
    seconds: float
    size_bytes: int
    precision: str
    tensorrt_rtx: str
    batch: dict[str, int]
    layers: int
    plugin_layers: dict[str, int]
    expected_plugins: dict[str, int]
    fp32_layers: int | None
    plugin_outputs: dict[str, list] = field(default_factory=dict)  # node -> [[dims (-1 dynamic), dtype], ...]
    ran: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"], d["onnx"] = str(self.path), str(self.onnx)
        return d


def estimated_build_bytes(graph: str | Path) -> int:
    """About the memory a build needs: the builder holds the weights about three times (the parsed
    network, its optimised copy and the engine), plus a base (measured in ``benchmarks/rtx_builds.py``)."""
    graph = Path(graph)
    size = sum(p.stat().st_size for p in (graph, graph.with_name(graph.name + ".data")) if p.exists())
    return settings.RTX_BUILD_MEMORY_FACTOR * size + settings.RTX_BUILD_MEMORY_BASE


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    target: int,
    options=None,
    *,
    batch_multiple: int = 1,
    input_shape: tuple[int, ...] | None = None,
) -> RTXEngineBuild:
    """Builds ``onnx_path`` for ``sm_<target>`` with TensorRT for RTX and writes ``engine_path``.

    The network is strongly typed (the graph's own precision); the profile's batches are whole routing
    groups (``batch_multiple`` images); plugin nodes become ``plugins.v3`` plugin layers whose kernels
    are compiled for the target (from ``$MOE_PLUGINS_PTX_DIR`` when a bundle precompiled them).
    ``options`` is an :class:`exporter.backends.tensorrt.EngineOptions` (batch profile, workspace,
    optimization level); TensorRT for RTX has no timing cache.

    Raises:
        RTXUnavailable: TensorRT for RTX is not installed.
        UserError: a target it cannot build, a graph too big for this machine's memory.
        CheckFailed: the parser or builder refused the graph, or a plugin node did not become a
            plugin layer with its kernel.
    """
    from exporter.backends.tensorrt import EngineOptions, graph_precision, input_profile, plugin_node_names

    options = options or EngineOptions()
    options.check()
    if options.timing_cache:
        raise UserError("TensorRT for RTX has no timing cache (it caches kernels at run time); drop `timing_cache`")
    (target,) = parse_targets([target])
    require_rtx("building an engine")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    precision, _ = graph_precision(onnx_path, options.precision)
    _check_memory(onnx_path)
    name, image, batch = input_profile(onnx_path, options, input_shape, batch_multiple)
    nodes = plugin_node_names(onnx_path)
    request = {
        "onnx": str(onnx_path),
        "engine": str(engine_path),
        "target": target,
        "input": name,
        "shapes": {k: [batch[k], *image] for k in ("min", "opt", "max")},
        "nodes": nodes,
        "precision": precision,
        "workspace_mib": options.workspace_mib,
        "opt_level": options.opt_level,
    }
    start = time.perf_counter()
    result = _run_child(request)
    return RTXEngineBuild(
        path=engine_path,
        onnx=onnx_path,
        target=f"sm_{target}",
        seconds=time.perf_counter() - start,
        size_bytes=engine_path.stat().st_size,
        precision=precision,
        tensorrt_rtx=result["version"],
        batch=batch,
        layers=result["layers"],
        plugin_layers=result["plugin_layers"],
        expected_plugins=dict(Counter(nodes.values())),
        fp32_layers=result["fp32_layers"],
        plugin_outputs=result["plugin_outputs"],
        notes=result["notes"],
    )


def _check_memory(onnx_path: Path) -> None:
    """A user error when the build would need more memory than this machine has available."""
    need, have = estimated_build_bytes(onnx_path), available_memory()
    if have is not None and need > have:
        raise UserError(
            f"{onnx_path} is too big to build here: the build needs about {need / 2**30:.1f} GiB of memory and "
            f"{have / 2**30:.1f} GiB is available; build on a machine with more memory"
        )


def _library_folder(folder: Path) -> Path:
    """A folder holding ``libtensorrt_rtx.so`` (a link to the wheel's ``.so.1``), which the RTX parser
    opens by that name when it creates a plugin."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    libs = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    real = libs / "libtensorrt_rtx.so.1" if libs else None
    if real is not None and real.is_file():
        (folder / "libtensorrt_rtx.so").symlink_to(real)
    return folder


def _run_child(request: dict) -> dict:
    """Runs the build in ``python -m exporter.backends.tensorrt_rtx`` and reads its JSON lines:
    progress as it comes (logged, each build phase once), then the result or the error it names."""
    progress = OncePerPhase(log)
    with tempfile.TemporaryDirectory(prefix="moe-export-rtx-") as tmp:
        # the kernels compile to PTX in the child: Triton's interpreter (the kernel tests') would refuse
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parents[2])  # where `exporter` and `plugins` are, for `-m`
        for name, first in (("LD_LIBRARY_PATH", str(_library_folder(Path(tmp)))), ("PYTHONPATH", root)):
            env[name] = os.pathsep.join(p for p in (first, env.get(name)) if p)
        child = subprocess.Popen(
            [sys.executable, "-m", "exporter.backends.tensorrt_rtx", json.dumps(request)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        answer = None
        for line in child.stdout:
            message = json.loads(line) if line.startswith("{") else {}
            if "progress" in message:
                progress(message["progress"])
            elif "result" in message or "error" in message:
                answer = message
        stderr = child.stderr.read()
        code = child.wait()
    if answer is not None and "result" in answer:
        return answer["result"]
    if answer is not None:
        kind = {"user": UserError, "check": CheckFailed}.get(answer.get("kind"), RuntimeError)
        raise kind(answer["error"])
    if code == -signal.SIGKILL:
        raise UserError(
            f"the TensorRT for RTX build of {request['onnx']} was killed, most likely for memory: the graph is too "
            "big to build on this machine"
        )
    ended = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [ended]
    raise RuntimeError(f"the TensorRT for RTX build process failed: {last[0][:300]}")


def _build_here(request: dict, emit: Callable[[dict], None]) -> dict:
    """The child's build (see :func:`build_engine`); returns the result the parent reads."""
    import tensorrt_rtx as trt

    from exporter.backends.tensorrt import progress_monitor
    from plugins import v3

    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # strongly typed: every network of TensorRT for RTX is
    parser = trt.OnnxParser(network, logger)
    nodes: dict[str, str] = request["nodes"]
    if nodes:
        v3.register_all(trt, request["target"])
    emit({"progress": f"Parsing {Path(request['onnx']).name}"})
    with _quiet_native():
        parsed = parser.parse_from_file(request["onnx"])
    if not parsed or parser.num_errors:
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        reason = errors[0]["message"] if errors else "; ".join(v3.errors() + logger.errors)[:300] or "unknown error"
        raise CheckFailed(f"TensorRT for RTX could not parse {request['onnx']}: {reason}")
    plugin_layers = _plugin_layers(trt, network, nodes)
    missing = {op: n for op, n in Counter(nodes.values()).items() if plugin_layers.get(op, 0) < n}
    if missing:
        raise CheckFailed(
            f"the network has plugin layers {plugin_layers or 'none'} but the graph has "
            f"{dict(Counter(nodes.values()))} plugin nodes: the parser used the nodes' local functions instead"
        )
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, TARGETS[request["target"]]), 0)
    profile = builder.create_optimization_profile()
    shapes = request["shapes"]
    profile.set_shape(request["input"], shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if request["workspace_mib"]:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request["workspace_mib"] << 20)
    if request["opt_level"] is not None:
        config.builder_optimization_level = request["opt_level"]
    config.progress_monitor = progress_monitor(trt, lambda text: emit({"progress": text}))
    emit({"progress": f"Building for sm_{request['target']}"})
    with _quiet_native():
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = "; ".join(v3.errors() + logger.errors[-1:]) or "unknown error"
        raise CheckFailed(f"TensorRT for RTX could not build {request['onnx']}: {one_line(RuntimeError(reason), 300)}")
    data = bytes(serialized)
    kernels = data.count(v3.KERNEL_FIELD.encode())
    if kernels < len(nodes):
        raise CheckFailed(f"the engine holds {kernels} plugin kernels for {len(nodes)} plugin layers")
    Path(request["engine"]).write_bytes(data)
    notes = []
    if request["precision"] != Precision.FP32:
        notes.append(f"{request['precision']} graph: the FP32 layers are its routing (and ops without the type)")
    return {
        "version": trt.__version__,
        "layers": network.num_layers,
        "plugin_layers": plugin_layers,
        "fp32_layers": _fp32_layers(trt, network) if request["precision"] != Precision.FP32 else None,
        "plugin_outputs": {
            layer.name: [
                [list(layer.get_output(i).shape), str(layer.get_output(i).dtype).rsplit(".", 1)[-1]]
                for i in range(layer.num_outputs)
            ]
            for layer in _layers(network)
            if layer.name in nodes
        },
        "notes": notes,
    }


def _plugin_layers(trt, network, nodes: dict[str, str]) -> dict[str, int]:
    """Plugin layers of the parsed network per op (the parser names a plugin layer after its node)."""
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, k)}
    counts: dict[str, int] = {}
    for layer in _layers(network):
        if layer.type in kinds and layer.name in nodes:
            counts[nodes[layer.name]] = counts.get(nodes[layer.name], 0) + 1
    return counts


def _fp32_layers(trt, network) -> int:
    """Layers that compute in FP32: a float32 output, not counting constants, casts and shape layers."""
    skipped = {trt.LayerType.CONSTANT, trt.LayerType.CAST, trt.LayerType.SHAPE}
    return sum(
        1
        for layer in _layers(network)
        if layer.type not in skipped and any(layer.get_output(i).dtype == trt.float32 for i in range(layer.num_outputs))
    )


class RTXEngineRunner(Runner):
    """A TensorRT for RTX engine on this machine's GPU as a runner (``exporter.backends.runner``):
    deserialized with the moe:: V3 plugins registered (their kernels are in the engine), buffers and
    copies through the CUDA runtime of cuda-python. Needs a GPU of the engine's target."""

    def __init__(self, engine_path: str | Path, name: str = BACKEND):
        require_rtx("running an engine")
        super().__init__(name)
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"{self.path} does not exist")

    def activate_impl(self) -> None:
        if gpu_arch() is None:
            raise RTXUnavailable(f"running {self.path.name} needs an NVIDIA RTX GPU of its target ({NOT_RUN})")
        import tensorrt_rtx as trt
        from cuda.bindings import runtime

        from plugins import v3

        v3.register_all(trt)
        self._trt, self._cuda = trt, runtime
        self._runtime = trt.Runtime(_Logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise UserError(f"TensorRT for RTX cannot load {self.path} on this GPU (built for another target?)")
        self._context = self._engine.create_execution_context()
        self._stream = _cuda_check(runtime.cudaStreamCreate())

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cuda, engine, context = self._trt, self._cuda, self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        buffers, outputs = [], {}
        try:
            for name in inputs:
                array = np.ascontiguousarray(feed_dict[name])
                context.set_input_shape(name, array.shape)
                buffers.append(_cuda_check(cuda.cudaMalloc(max(array.nbytes, 1))))
                kind = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice
                _cuda_check(cuda.cudaMemcpy(buffers[-1], array.ctypes.data, array.nbytes, kind))
                context.set_tensor_address(name, buffers[-1])
            for name in (n for n in names if n not in inputs):
                shape = tuple(context.get_tensor_shape(name))
                outputs[name] = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(name)))
                buffers.append(_cuda_check(cuda.cudaMalloc(max(outputs[name].nbytes, 1))))
                context.set_tensor_address(name, buffers[-1])
            if not context.execute_async_v3(self._stream):
                raise RuntimeError(f"TensorRT for RTX failed to run {self.path.name}")
            _cuda_check(cuda.cudaStreamSynchronize(self._stream))
            kind = cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for array, buffer in zip(outputs.values(), buffers[len(inputs) :]):
                _cuda_check(cuda.cudaMemcpy(array.ctypes.data, buffer, array.nbytes, kind))
        finally:
            for buffer in buffers:
                cuda.cudaFree(buffer)
        return outputs

    def deactivate_impl(self) -> None:
        self._context = self._engine = self._runtime = None


def _cuda_check(result):
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else None


def main(argv: list[str]) -> int:
    """The child process: one build, JSON lines on stdout."""

    def emit(message: dict) -> None:
        print(json.dumps(message), flush=True)

    try:
        emit({"result": _build_here(json.loads(argv[0]), emit)})
    except (UserError, CheckFailed) as e:
        emit({"error": str(e), "kind": "user" if isinstance(e, UserError) else "check"})
    except MemoryError:
        emit({"error": "the build ran out of memory: the graph is too big to build on this machine", "kind": "user"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = [
    "BACKEND",
    "ParseReport",
    "RTXEngineBuild",
    "RTXEngineRunner",
    "RTXUnavailable",
    "TARGETS",
    "build_engine",
    "check_targets",
    "gpu_arch",
    "parse_graph",
    "parse_structure",
    "parse_targets",
    "require_rtx",
    "rtx_available",
]
