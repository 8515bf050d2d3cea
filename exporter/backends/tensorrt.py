"""TensorRT engines: build, inspect and run, through Polygraphy's loaders over TensorRT's Python API.

The only exporter module that imports tensorrt, always inside functions: ``import exporter.backends.tensorrt``
works everywhere, and ``tensorrt_available()`` says in one line why TensorRT cannot be used here.
Written against TensorRT 10.9 to 11.x (``tensorrt.plugin`` AOT plugins need 10.9); where TensorRT is
absent every entry point raises :class:`TensorRTUnavailable` (exit code 2) before doing anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporter import settings
from exporter.backends.runner import Runner
from exporter.errors import CheckFailed, UserError, one_line
from exporter.fileio import atomic_path
from exporter.formats.graph import image_input, input_dims, precision, read_header
from exporter.progress import OncePerPhase, phase
from exporter.settings import Precision

log = logging.getLogger(__name__)

PRECISIONS = settings.PRECISIONS
INSTALL_HINT = (
    "install TensorRT >= 10.9 on a machine with an NVIDIA GPU (`pip install tensorrt` on x86_64 or SBSA; "
    "JetPack's TensorRT on Jetson)"
)


@contextlib.contextmanager
def quiet_polygraphy(severity: str = "ERROR"):
    """Polygraphy logs to stdout, which belongs to our tables and ``--json -``: only ``severity`` and
    worse get through, without colours (and so without its hint to install a colour module)."""
    from polygraphy.logger import G_LOGGER

    colors = G_LOGGER.colors
    G_LOGGER.colors = False
    try:
        with G_LOGGER.verbosity(getattr(G_LOGGER, severity)):
            yield
    finally:
        G_LOGGER.colors = colors


class TensorRTUnavailable(UserError):
    """TensorRT or a CUDA GPU is missing: a usage/environment error (exit code 2)."""


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None when ``import tensorrt`` fails."""
    if not _installed("tensorrt"):
        return None
    try:
        import tensorrt as trt
    except Exception:
        return None
    return trt.__version__


def tensorrt_available() -> str | None:
    """None when TensorRT (>= 10.9) and a CUDA GPU are usable here, else the reason in a few words."""
    if not _installed("tensorrt"):
        return "TensorRT is not installed"
    try:
        import tensorrt as trt
    except Exception as e:  # libraries missing behind the bindings, driver mismatch, ...
        return f"TensorRT does not import ({one_line(e, 140)})"
    if _version_tuple(trt.__version__) < settings.MIN_TENSORRT:
        need = ".".join(map(str, settings.MIN_TENSORRT))
        return f"TensorRT {trt.__version__} is too old (the moe:: AOT plugins need >= {need})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def numpy_plugin_conflict(tensorrt: str, numpy_version: str) -> str | None:
    """Why plugin nodes cannot be created with this TensorRT and NumPy, or None.

    TensorRT 10.9 to 11.1 turn each integer plugin attribute into a Python int with ``int(array)``
    (``tensorrt/plugin/_plugin_class.py``), which NumPy >= 2.4 refuses for 1-element arrays: every
    moe:: node with attributes fails to be created. Fixed in TensorRT 11.2.
    """
    trt_v, np_v = _version_tuple(tensorrt), _version_tuple(numpy_version)
    if (10, 9) <= trt_v < (11, 2) and np_v >= (2, 4):
        return (
            f"TensorRT {tensorrt} cannot create plugin nodes with NumPy {numpy_version} (it converts plugin "
            "attributes with int(array), which NumPy >= 2.4 refuses): pip install 'numpy<2.4', or TensorRT >= 11.2"
        )
    return None


def require_tensorrt(doing: str) -> None:
    """Raises TensorRTUnavailable: '<doing> needs TensorRT: <reason>; <install hint>'."""
    reason = tensorrt_available()
    if reason is not None:
        raise TensorRTUnavailable(f"{doing} needs TensorRT and a GPU: {reason}; {INSTALL_HINT}")


@dataclass(frozen=True)
class EngineOptions:
    """Build options, named like trtexec's.

    Attributes:
        precision: What the graph must hold (``settings.PRECISIONS``: ``fp32``, ``fp16``, ``bf16``, the
            Q/DQ ``int8`` and ``fp8``, the weight-only ``w8`` and ``w4``); None takes the graph's.
            The network is always strongly typed: the precision is the graph's own (``moe-export export
            --precision``), never a builder flag. FP32 builds with TF32 off (exact FP32 parity).
        min_batch, opt_batch, max_batch: The optimization profile of the batch axis (images); None
            takes the graph's static batch or the model's default batch.
        workspace_mib: Workspace memory pool limit (``--memPoolSize=workspace:N``); None = TensorRT's.
        timing_cache: A timing cache file, read if present and updated (``--timingCacheFile``).
        opt_level: Builder optimization level 0-5 (``--builderOptimizationLevel``); None = TensorRT's 3.
    """

    precision: str | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    workspace_mib: int | None = None
    timing_cache: str | None = None
    opt_level: int | None = None

    def check(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        batches = [b for b in (self.min_batch, self.opt_batch, self.max_batch) if b is not None]
        if any(b < 1 for b in batches):
            raise UserError("batch sizes must be >= 1")
        if batches != sorted(batches):
            raise UserError(f"need min batch <= opt batch <= max batch, got {batches}")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise UserError(f"builder optimization level must be 0-5, got {self.opt_level}")


@dataclass
class EngineBuild:
    """What ``build_engine`` made: the file, the layers, and the plugin layers found in the engine."""

    path: Path
    onnx: Path
    seconds: float
    size_bytes: int
    precision: str
    tensorrt: str
    batch: dict[str, int]
    layers: int
    plugin_layers: dict[str, int]  # plugin op -> layers of that plugin in the engine
    expected_plugins: dict[str, int]  # plugin op -> plugin nodes in the ONNX graph
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"], d["onnx"] = str(self.path), str(self.onnx)
        return d


def plugin_node_names(onnx_path: str | Path) -> dict[str, str]:
    """``{node name: plugin op}`` of the moe:: plugin nodes in a graph (read without weights)."""
    from plugins import registry

    model = read_header(onnx_path)
    return {n.name: n.op_type for n in model.graph.node if registry.is_plugin_node(n)}


def plugin_nodes(onnx_path: str | Path) -> dict[str, int]:
    """``{plugin op: count}`` of the moe:: plugin nodes in a graph."""
    return dict(Counter(plugin_node_names(onnx_path).values()))


def progress_monitor(trt, report: Callable[[str], None]):
    """A ``trt.IProgressMonitor`` (of TensorRT or TensorRT for RTX: ``trt`` is the module) that
    reports each build phase and its steps."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            report(f"{phase_name} (0/{num_steps})")

        def step_complete(self, phase_name, step):
            report(f"{phase_name} ({step + 1}/{self.steps.get(phase_name, '?')})")
            return True  # keep building

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


PLUGIN_LAYER_TYPES = ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN")


def _count_network_plugins(counts: dict[str, int], nodes: dict[str, str]):
    """Network postprocessing that counts the parsed network's plugin layers per op (documented
    INetworkDefinition API, no inspector JSON): a node the parser turned into its local function
    instead gives no plugin layer."""
    import tensorrt as trt

    kinds = {getattr(trt.LayerType, k) for k in PLUGIN_LAYER_TYPES if hasattr(trt.LayerType, k)}

    def apply(network):
        counts.clear()
        for layer in network:
            if layer.type in kinds:
                op = next((op for node, op in nodes.items() if layer.name == node or node in layer.name), None)
                if op is not None:
                    counts[op] = counts.get(op, 0) + 1
        return network

    return apply


def inspect_plugin_layers(engine, nodes: dict[str, str]) -> tuple[int, dict[str, int]]:
    """(layers, {plugin op: plugin layers}) of a deserialized engine, from the engine inspector's JSON
    (built with detailed profiling verbosity). A plugin layer is one whose type says plugin; it is
    attributed to a plugin node by name (the parser names a layer after its node) or by the plugin
    name in its details. ``nodes`` maps the graph's plugin node names to their ops."""
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    return count_plugin_layers(json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)), nodes)


def count_plugin_layers(info: dict, nodes: dict[str, str]) -> tuple[int, dict[str, int]]:
    """The counting of :func:`inspect_plugin_layers` on the inspector's parsed JSON, in both known
    forms: detailed (a dict per layer, ``LayerType`` naming a plugin, or the plugin in its details) and
    names only (a string per layer: counted when it is exactly a plugin node's name; an inlined local
    function's layers carry suffixes). The build's pass criterion is the parsed network's plugin
    layers (:func:`_count_network_plugins`); this count is reported beside it."""
    layers = info.get("Layers", [])
    counts: dict[str, int] = {}
    for layer in layers:
        detail = layer if isinstance(layer, dict) else {"Name": str(layer)}
        text, name = json.dumps(detail), str(detail.get("Name", ""))
        by_name = isinstance(layer, str) and name in nodes  # a layer named exactly after a plugin node
        if not by_name and "Plugin" not in str(detail.get("LayerType", "")) and "Plugin" not in text:
            continue
        op = next((op for node, op in nodes.items() if node in name), None)
        op = op or next((op for op in set(nodes.values()) if op in text), None)
        if op is not None:
            counts[op] = counts.get(op, 0) + 1
    return len(layers), counts


def _register_plugins() -> None:
    from plugins.register import register_all

    try:
        register_all()
    except RuntimeError as e:
        raise TensorRTUnavailable(str(e)) from None


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    options: EngineOptions = EngineOptions(),
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_multiple: int = 1,
) -> EngineBuild:
    """Parses ``onnx_path`` (moe:: plugin nodes go to the registered Quickly Deployable Plugins, AOT),
    builds, checks the plugin layers with the engine inspector and writes ``engine_path`` atomically.

    Args:
        onnx_path: A portable or plugin graph (one image input, batch first).
        engine_path: The ``.engine`` to write.
        options: Precision, batch profile, workspace, timing cache, optimization level.
        input_shape: One image's shape, e.g. (3, 224, 224), when the graph's input is not static
            beyond the batch.
        batch_multiple: Images per routing group (V-MoE); every profile batch must be a multiple.

    Raises:
        TensorRTUnavailable: TensorRT or the GPU is missing (before anything is built).
        CheckFailed: the engine lacks plugin layers the graph asks for (the parser fell back to the
            nodes' local functions) or the build failed.
    """
    options.check()
    require_tensorrt("building an engine")
    import tensorrt as trt

    start = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    precision, routing = graph_precision(onnx_path, options.precision)
    nodes = _plugins_to_build(onnx_path)
    expected = dict(Counter(nodes.values()))
    name, image, batch = input_profile(onnx_path, options, input_shape, batch_multiple)
    profile = _profile(name, image, batch)
    network_plugins: dict[str, int] = {}
    network = _network(onnx_path, nodes, network_plugins)
    config = _config(profile, options)
    engine_bytes = _build(network, config, onnx_path, precision, batch, options.timing_cache)
    layers, inspected, found = _verify(engine_bytes, onnx_path, nodes, expected, network_plugins)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(engine_bytes))
    return EngineBuild(
        path=engine_path,
        onnx=onnx_path,
        seconds=time.perf_counter() - start,
        size_bytes=engine_path.stat().st_size,
        precision=precision,
        tensorrt=trt.__version__,
        batch=batch,
        layers=layers,
        plugin_layers=found,
        expected_plugins=expected,
        notes=_build_notes(precision, routing, inspected, network_plugins),
    )


def _plugins_to_build(onnx_path: Path) -> dict[str, str]:
    """The graph's plugin nodes (``{node name: plugin op}``); when there are any, the moe:: plugins are
    registered, after checking that this TensorRT and NumPy can create them."""
    import tensorrt as trt

    nodes = plugin_node_names(onnx_path)
    if nodes:
        conflict = numpy_plugin_conflict(trt.__version__, np.__version__)
        if conflict:
            raise TensorRTUnavailable(conflict)
        _register_plugins()
    return nodes


def input_profile(
    onnx_path: Path, options: EngineOptions, input_shape: tuple[int, ...] | None, batch_multiple: int
) -> tuple[str, tuple[int, ...], dict[str, int]]:
    """(input name, one image's shape, ``{"min", "opt", "max"}`` batches) of the optimization profile:
    the image shape is the graph's where it is static beyond the batch, else ``input_shape``."""
    value = image_input(read_header(onnx_path))
    dims = [d if isinstance(d, int) else None for d in input_dims(value)]
    image = tuple(dims[1:]) if all(dims[1:]) else input_shape
    if image is None:
        raise UserError(f"{onnx_path}'s input {value.name} has dynamic image dimensions; give the input shape")
    return value.name, image, profile_batch(dims[0], options, batch_multiple)


def _profile(name: str, image: tuple[int, ...], batch: dict[str, int]):
    """The optimization profile: the input's min, opt and max batches of ``image``-shaped images."""
    from polygraphy.backend.trt import Profile

    return Profile().add(name, min=(batch["min"], *image), opt=(batch["opt"], *image), max=(batch["max"], *image))


def _network(onnx_path: Path, nodes: dict[str, str], network_plugins: dict[str, int]):
    """The network loader: the ONNX parser's, strongly typed, counting its plugin layers into
    ``network_plugins`` when it runs."""
    from polygraphy.backend.trt import NetworkFromOnnxPath, PostprocessNetwork

    # strongly typed on 10.x and 11.x: every layer computes in the type the graph gives its tensors
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    return PostprocessNetwork(network, _count_network_plugins(network_plugins, nodes), "CountPluginLayers")


def _config(profile, options: EngineOptions):
    """The builder config loader: the profile, timing cache, workspace, optimization level, detailed
    profiling (for the engine inspector) and the progress monitor."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig

    pools = {trt.MemoryPoolType.WORKSPACE: options.workspace_mib << 20} if options.workspace_mib else None
    timing_cache = options.timing_cache
    return CreateConfig(
        profiles=[profile],
        load_timing_cache=timing_cache if timing_cache and os.path.exists(timing_cache) else None,
        memory_pool_limits=pools,
        builder_optimization_level=options.opt_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        progress_monitor=progress_monitor(trt, OncePerPhase(log)),
    )


def _build(network, config, onnx_path: Path, precision: str, batch: dict[str, int], timing_cache: str | None):
    """The serialized engine; a parser or builder error is a CheckFailed with its last line."""
    import tensorrt as trt
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    building = f"Building the TensorRT {trt.__version__} engine ({precision}, strongly typed, batch {batch})"
    with phase(log, building), quiet_polygraphy("WARNING"):
        try:
            return EngineBytesFromNetwork(network, config=config, save_timing_cache=timing_cache)()
        except PolygraphyException as e:  # Polygraphy reports parser and builder errors so
            reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise CheckFailed(f"TensorRT could not build {onnx_path}: {reason}") from None


def _verify(
    engine_bytes, onnx_path: Path, nodes: dict[str, str], expected: dict[str, int], network_plugins: dict[str, int]
) -> tuple[int, dict[str, int], dict[str, int]]:
    """(layers, plugin layers the engine inspector shows, plugin layers found) of the built engine;
    a CheckFailed when it does not deserialize or the parsed network lacks plugin layers the graph asks for."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(bytes(engine_bytes))
    if engine is None:
        raise CheckFailed(f"TensorRT built {onnx_path} but cannot deserialize the engine it made")
    layers, inspected = inspect_plugin_layers(engine, nodes)
    found = {op: max(network_plugins.get(op, 0), inspected.get(op, 0)) for op in set(network_plugins) | set(inspected)}
    missing = {op: n for op, n in expected.items() if network_plugins.get(op, 0) < n}
    if missing:
        raise CheckFailed(
            f"the engine has {found or 'no'} plugin layers but the graph has {expected} plugin nodes: the parser "
            "used the nodes' local functions instead of the moe:: plugins (are they registered, TensorRT >= 10.9?)"
        )
    return layers, inspected, found


def _build_notes(precision: str, routing: str, inspected: dict[str, int], network_plugins: dict[str, int]) -> list[str]:
    notes = []
    if precision != Precision.FP32:
        notes.append(f"{precision} graph with the routing in {'FP32' if routing == 'fp32' else precision}")
    if inspected != {op: n for op, n in network_plugins.items() if n}:
        notes.append(
            f"the engine inspector's JSON shows plugin layers {inspected or 'none'}, the network {network_plugins}"
        )
    return notes


def graph_precision(onnx_path: str | Path, wanted: str | None = None) -> tuple[str, str]:
    """(precision, routing precision) of a graph, as its metadata records them; a user error when
    ``wanted`` is another precision (the graph's own is what a strongly typed network builds)."""
    found = precision(read_header(onnx_path))
    if wanted is not None and wanted != found[0]:
        raise UserError(
            f"{onnx_path} is typed {found[0]} and TensorRT builds it strongly typed, in the types it holds: for "
            f"{wanted}, export it with `precision={wanted}` (or build the bundle with `precision={wanted}`)"
        )
    return found


def profile_batch(static: int | None, options: EngineOptions, multiple: int = 1) -> dict[str, int]:
    given = [b for b in (options.min_batch, options.opt_batch, options.max_batch) if b is not None]
    if any(b % multiple for b in given):
        raise UserError(f"batch sizes {given} must be multiples of the routing group ({multiple} images)")
    if static:  # a graph with a fixed batch allows only that batch
        given = {b for b in (options.min_batch, options.opt_batch, options.max_batch) if b is not None}
        if given - {static}:
            raise UserError(f"the graph's batch is fixed at {static}; it cannot be built for batches {sorted(given)}")
        return {"min": static, "opt": static, "max": static}
    opt = options.opt_batch or options.max_batch or options.min_batch or multiple
    return {"min": options.min_batch or multiple, "opt": opt, "max": options.max_batch or opt}


class EngineRunner(Runner):
    """Runs a serialized engine on numpy inputs with Polygraphy's TrtRunner, as a runner
    (``exporter.backends.runner``): ``with EngineRunner(path) as runner: outputs = runner.infer({name: array})``
    """

    def __init__(self, engine_path: str | Path, name: str = "tensorrt"):
        require_tensorrt("running an engine")
        super().__init__(name)
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserError(f"{self.path} does not exist")
        self._runner = None

    def activate_impl(self) -> None:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        if _installed("tensorrt.plugin"):
            _register_plugins()  # AOT engines need no Python; registering keeps JIT engines loadable too
        self._runner = TrtRunner(EngineFromBytes(self.path.read_bytes()), name=f"tensorrt:{self.path.name}")
        with quiet_polygraphy("WARNING"):
            self._runner.activate()

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with quiet_polygraphy("WARNING"):
            outputs = self._runner.infer(feeds)
        return {k: np.asarray(v) for k, v in outputs.items()}

    def infer_on_device(self, feeds: dict) -> dict:
        """Inputs and outputs as CUDA torch tensors: no host copies, what a serving loop sees."""
        with quiet_polygraphy("WARNING"):
            return dict(self._runner.infer(feeds, copy_outputs_to_host=False))

    @property
    def last_inference_ms(self) -> float:
        return self._runner.last_inference_time() * 1e3

    def deactivate_impl(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None


__all__ = [
    "EngineBuild",
    "EngineOptions",
    "EngineRunner",
    "PRECISIONS",
    "TensorRTUnavailable",
    "build_engine",
    "plugin_nodes",
    "require_tensorrt",
    "tensorrt_available",
    "tensorrt_version",
]
