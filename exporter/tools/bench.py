"""Latency and throughput of one model on every backend the machine has: PyTorch eager, torch.compile,
ONNX Runtime (CPU, CUDA) and TensorRT engines of the portable and the plugin graph.

Each backend gets the same seeded images: ``warmup`` untimed runs, then ``runs`` timed runs; a row
reports the median and p90 (nearest rank) latency, images/s at the median, what the backend needed
before its first run (``setup_s``) and the max relative error of its first output against PyTorch
eager (``max|a-b| / max|b|``), so a fast but wrong backend shows. A backend the machine lacks is a
``skipped`` row with the reason; one that fails (torch.compile on an unsupported model, an engine
that does not build) is an ``n/a`` row with a one-line reason, never a crash.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporter import settings
from exporter.backends import onnxruntime as ort_backend
from exporter.compare import max_rel_err
from exporter.errors import UserError, one_line
from exporter.formats.graph import image_input, read_header
from exporter.progress import phase
from exporter.settings import Precision
from exporter.sources.loading import LoadedModel, ModelSource, check_batch, load
from exporter.versions import package_version

log = logging.getLogger(__name__)

TORCH_EAGER, TORCH_COMPILE = "torch-eager", "torch-compile"
ORT_CPU, ORT_CUDA = "onnxruntime-cpu", "onnxruntime-cuda"
TENSORRT, TENSORRT_PLUGINS, TENSORRT_RTX = "tensorrt", "tensorrt-plugins", "tensorrt-rtx"
BACKENDS = (TORCH_EAGER, TORCH_COMPILE, ORT_CPU, ORT_CUDA, TENSORRT, TENSORRT_PLUGINS, TENSORRT_RTX)
ONNX_BACKENDS = (ORT_CPU, ORT_CUDA, TENSORRT, TENSORRT_PLUGINS, TENSORRT_RTX)
OK, NOT_AVAILABLE, SKIPPED, BUILT = "ok", "n/a", "skipped", "built"


@dataclass
class BenchRow:
    """One backend. Timings are ``None`` unless ``status`` is ``"ok"``; ``note`` says why otherwise.

    ``setup_s`` is what the backend needs beyond building the PyTorch model: nothing for eager, the
    compilation (first call) for torch.compile, export + session for ONNX Runtime, export (+ rewrite)
    + engine build for TensorRT.
    """

    backend: str
    batch: int
    median_ms: float | None = None
    p90_ms: float | None = None
    images_per_s: float | None = None
    setup_s: float | None = None
    status: str = OK
    note: str = ""
    max_rel_err: float | None = None
    device: str = "cpu"
    busy_elsewhere: float | None = None  # share of the CPUs other processes used during the timed runs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchReport:
    model: str
    batch: int
    warmup: int
    runs: int
    threads: int
    machine: dict[str, str | None]  # cpu, gpu, torch, onnxruntime, tensorrt
    rows: list[BenchRow]
    load_s: float = 0.0  # building the PyTorch model (seeded weights or checkpoint)
    export_s: float | None = None  # the portable graph, shared by the ONNX Runtime and TensorRT rows
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, backend: str) -> BenchRow:
        return next(r for r in self.rows if r.backend == backend)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_backends(text: str | None) -> tuple[str, ...]:
    """``"torch-eager,onnxruntime-cpu"`` (or ``"all"``, or ``None``) -> backend names in run order."""
    if text is None:
        return BACKENDS
    names = [n.strip() for n in text.split(",") if n.strip()]
    return check_backends(BACKENDS if names == ["all"] else names)


def check_backends(names) -> tuple[str, ...]:
    if names is None:
        return BACKENDS
    names = list(names)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; known: {', '.join(BACKENDS)}")
    if not names:
        raise UserError(f"give at least one backend of {', '.join(BACKENDS)}")
    return tuple(n for n in BACKENDS if n in names)


def percentile(sorted_times: list[float], q: float) -> float:
    """Nearest-rank percentile of ascending values: the smallest value with at least q% at or below it."""
    return sorted_times[max(0, math.ceil(q / 100 * len(sorted_times)) - 1)]


def time_runs(fn: Callable[[], object], warmup: int, runs: int) -> tuple[list[float], object]:
    """Seconds of each timed run (after ``warmup`` untimed ones) and the last run's result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) where /proc/stat exists."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def busy_elsewhere(fn: Callable[[], object]) -> tuple[object, float | None]:
    """``fn()`` and the share of all CPUs that other processes used meanwhile (None where unknown).

    PyTorch's OpenMP threads wait for each other at every op, so a core taken by another process can
    slow eager CPU inference several times over; a row says so rather than report inflated times."""
    before, start = _cpu_seconds(), time.perf_counter()
    result = fn()
    after, wall = _cpu_seconds(), time.perf_counter() - start
    if before is None or after is None or wall <= 0:
        return result, None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return result, min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))


def _quiet():
    """torch.compile and the exporters log and warn on their own; the report says what matters."""
    from exporter.export.export import quiet_torch

    return quiet_torch(logging.CRITICAL)


def _first_tensor(out) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            out = next(iter(out.values()))
        elif isinstance(out, (list, tuple)):
            out = out[0]
        else:
            raise UserError(f"model output of type {type(out).__name__} holds no tensor")
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, str | None]:
    import onnxruntime as ort

    return {
        "cpu": f"{_cpu_name()} ({os.cpu_count()} cores)",
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "tensorrt": package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
    }


def tensorrt_reason() -> str | None:
    """None when TensorRT engines can be built and run here, else why not (``import exporter.backends.tensorrt``
    never imports tensorrt; ``tensorrt_available`` does so only when it is installed)."""
    from exporter.backends.tensorrt import tensorrt_available

    return tensorrt_available()


def ort_cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "ONNX Runtime has no CUDAExecutionProvider (onnxruntime-gpu not installed)"
    return None


def _unavailable(backend: str) -> str | None:
    if backend == ORT_CUDA:
        return ort_cuda_reason()
    if backend in (TENSORRT, TENSORRT_PLUGINS):
        return tensorrt_reason()
    if backend == TENSORRT_RTX:
        from exporter.backends.tensorrt_rtx import rtx_available

        return rtx_available()
    return None


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def bench(
    source: ModelSource,
    *,
    batch: int | None = None,
    warmup: int = settings.BENCH_WARMUP,
    runs: int = settings.BENCH_RUNS,
    backends=None,
    threads: int | None = None,
    device: str | None = None,
    seed: int = settings.DEFAULT_SEED,
) -> BenchReport:
    """Times one model on each backend and compares its first output with PyTorch eager.

    Args:
        source: The model (``exporter.from_zoo``, ``from_module``, ...).
        batch: Images per run, a multiple of the routing group; default ``settings.default_batch``.
        warmup: Untimed runs per backend before the timed ones.
        runs: Timed runs per backend.
        backends: Names from ``BACKENDS`` or a comma-separated string of them ("all": every one; the
            default); those the machine lacks become skipped rows.
        threads: PyTorch threads and ONNX Runtime intra-op threads (default: every CPU core).
        device: Where PyTorch runs, ``"cpu"`` or ``"cuda"`` (default: CUDA when available).
        seed: Seed of the random input images.
    """
    names = parse_backends(backends) if isinstance(backends, str) else check_backends(backends)
    threads, device = _check_settings(warmup, runs, threads, device)
    start = time.perf_counter()
    with _torch_threads(threads):
        with phase(log, f"Building {source.name}"):
            t0 = time.perf_counter()
            loaded = load(source)
            load_s = time.perf_counter() - t0
        batch = batch or settings.default_batch(loaded.batch_multiple, "bench")
        check_batch(batch, loaded)
        images = np.random.default_rng(seed).standard_normal((batch, *source.input_shape), dtype=np.float32)
        report = BenchReport(
            model=source.name,
            batch=batch,
            warmup=warmup,
            runs=runs,
            threads=threads,
            machine=machine_info(device),
            rows=[],
            load_s=load_s,
        )
        reasons = {n: _unavailable(n) for n in names}
        rows = {n: BenchRow(n, batch, status=SKIPPED, note=r, device="cuda") for n, r in reasons.items() if r}
        with tempfile.TemporaryDirectory(prefix="moe-export-bench-") as tmp:
            graph, export_error = None, None
            if any(n in ONNX_BACKENDS and n not in rows for n in names):
                graph, report.export_s, export_error = _export(loaded, Path(tmp))
            multiple = loaded.batch_multiple
            rows.update(_bench_torch(loaded, images, names, device, warmup, runs))
            del loaded  # big models: free PyTorch's weights before ONNX Runtime and TensorRT load theirs
            _collect(device)
            reference = rows.pop("_reference")
            graph_rows = _GraphRows(graph, export_error, report.export_s, Path(tmp), threads, multiple, warmup, runs)
            for name in (n for n in names if n in ONNX_BACKENDS and n not in rows):
                rows[name] = graph_rows.row(name, images, reference)
        report.rows = [rows[n] for n in names]
        report.seconds = time.perf_counter() - start
        if device == "cuda":
            report.notes.append("ONNX Runtime and TensorRT times include copying the images in and the outputs out")
        return report


def _check_settings(warmup: int, runs: int, threads: int | None, device: str | None) -> tuple[int, str]:
    """(threads, device) of the run, their defaults filled in: every CPU core, CUDA when available; a
    user error for a negative warm-up, no timed run, or a device this machine lacks."""
    if warmup < 0 or runs < 1:
        raise UserError(f"need warmup >= 0 and runs >= 1, got warmup {warmup} and runs {runs}")
    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"device {device!r} is not available here (cpu, or cuda with a CUDA GPU)")
    return threads, device


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """PyTorch runs on ``threads`` threads for the block; its own count is restored after."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def _collect(device: str) -> None:
    """Frees what is no longer referenced: Python's garbage, and on CUDA PyTorch's cached blocks."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _GraphRows:
    """The rows of the ONNX backends, all timing the one exported graph (``None`` when the export
    failed with ``export_error``): a row's setup includes the export's seconds."""

    graph: Path | None
    export_error: str | None
    export_s: float | None
    folder: Path
    threads: int
    multiple: int
    warmup: int
    runs: int

    def row(self, name: str, images: np.ndarray, reference: np.ndarray) -> BenchRow:
        if self.graph is None:
            return BenchRow(name, images.shape[0], status=NOT_AVAILABLE, note=f"no ONNX graph: {self.export_error}")
        row = _bench_graph(
            name, self.graph, self.folder, images, reference, self.threads, self.multiple, self.warmup, self.runs
        )
        if row.setup_s is not None:
            row.setup_s += self.export_s
        gc.collect()
        return row


def _export(loaded: LoadedModel, folder: Path) -> tuple[Path | None, float | None, str | None]:
    from exporter.export.export import export_onnx

    path = folder / "portable.onnx"
    try:
        with _quiet():
            result = export_onnx(loaded, path)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return None, None, one_line(e)
    return path, result.seconds, None


def _bench_torch(loaded: LoadedModel, images: np.ndarray, names, device: str, warmup: int, runs: int) -> dict:
    """The eager reference output (key ``"_reference"``) and the PyTorch rows."""
    batch, sync = images.shape[0], _sync(device)
    module = loaded.module.to(device)
    x = torch.from_numpy(images).to(device)
    rows: dict = {}
    with torch.inference_mode():
        with phase(log, f"Running PyTorch eager on {batch} images ({device})"):
            try:
                rows["_reference"] = _first_tensor(module(x)).float().cpu().numpy()
            except (RuntimeError, ValueError, IndexError) as e:  # as exporter.models.capture.run_with_routing
                shape = "x".join(map(str, x.shape))
                raise UserError(f"model does not run on input {shape}: {one_line(e)}") from None
        if TORCH_EAGER in names:

            def eager():
                out = module(x)
                sync()
                return out

            rows[TORCH_EAGER] = _timed_row(TORCH_EAGER, batch, eager, 0.0, rows["_reference"], warmup, runs)
            rows[TORCH_EAGER].device = device
        if TORCH_COMPILE in names:
            rows[TORCH_COMPILE] = _bench_compile(module, x, rows["_reference"], sync, warmup, runs)
            rows[TORCH_COMPILE].device = device
    return rows


def _bench_compile(module, x, reference, sync, warmup, runs) -> BenchRow:
    batch = x.shape[0]
    try:
        with phase(log, "Compiling with torch.compile (first call)"), _quiet():
            compiled = torch.compile(module)
            start = time.perf_counter()
            compiled(x)
            sync()
            setup = time.perf_counter() - start
    except KeyboardInterrupt:
        raise
    except Exception as e:
        torch._dynamo.reset()
        return BenchRow(TORCH_COMPILE, batch, status=NOT_AVAILABLE, note=one_line(e))

    def run():
        out = compiled(x)
        sync()
        return out

    try:
        return _timed_row(TORCH_COMPILE, batch, run, setup, reference, warmup, runs)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return BenchRow(TORCH_COMPILE, batch, status=NOT_AVAILABLE, note=one_line(e))
    finally:
        torch._dynamo.reset()


def _timed_row(backend, batch, fn, setup_s, reference, warmup, runs, note="") -> BenchRow:
    with phase(log, f"Timing {backend} ({warmup} warm-up + {runs} runs)"):
        (times, last), busy = busy_elsewhere(lambda: time_runs(fn, warmup, runs))
    if busy is not None and busy >= settings.BENCH_BUSY_NOTE:
        note = "; ".join(n for n in (note, f"busy machine: other processes used {busy:.0%} of the CPUs") if n)
    if isinstance(last, dict):  # named outputs (the runners'; TensorRT's on device: CUDA torch tensors)
        last = next(iter(last.values()))
        last = last.float().cpu().numpy() if isinstance(last, torch.Tensor) else last
    elif isinstance(last, list):
        last = last[0]
    else:
        last = _first_tensor(last).float().cpu().numpy()
    times.sort()
    median = statistics.median(times)
    return BenchRow(
        backend,
        batch,
        median_ms=median * 1e3,
        p90_ms=percentile(times, 90) * 1e3,
        images_per_s=batch / median,
        setup_s=setup_s,
        note=note,
        max_rel_err=max_rel_err(np.asarray(last), reference),
        busy_elsewhere=busy,
    )


def _bench_graph(name, graph, folder: Path, images, reference, threads, multiple, warmup, runs) -> BenchRow:
    """An ONNX Runtime or TensorRT row; any failure becomes an ``n/a`` row with the reason."""
    batch = images.shape[0]
    try:
        if name in (ORT_CPU, ORT_CUDA):
            return _bench_ort(name, graph, images, reference, threads, warmup, runs)
        if name == TENSORRT_RTX:
            return _bench_rtx(graph, folder, images, reference, multiple, warmup, runs)
        return _bench_tensorrt(name, graph, folder, images, reference, multiple, warmup, runs)
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return BenchRow(
            name, batch, status=NOT_AVAILABLE, note=one_line(e), device="cpu" if name == ORT_CPU else "cuda"
        )


def _bench_ort(name, graph, images, reference, threads, warmup, runs) -> BenchRow:
    provider = ort_backend.CPU if name == ORT_CPU else ort_backend.CUDA
    runner = ort_backend.OnnxRuntimeRunner(graph, provider=provider, threads=threads, name=name)
    with phase(log, f"Creating the {name} session"):
        start = time.perf_counter()
        runner.activate()
        setup = time.perf_counter() - start
    try:
        if runner.active_provider != provider:
            return BenchRow(name, images.shape[0], status=NOT_AVAILABLE, note=f"{provider} did not load", device="cuda")
        feed = {image_input(read_header(graph)).name: images}
        row = _timed_row(name, images.shape[0], lambda: runner.infer(feed), setup, reference, warmup, runs)
    finally:
        runner.deactivate()
    row.device = "cpu" if name == ORT_CPU else "cuda"
    return row


def _plugin_graph(graph, folder: Path) -> tuple[Path, float, str]:
    """The plugin graph of the exported one: (path, rewrite seconds, the row's note)."""
    from exporter.rewrite.rewrite import rewrite_onnx

    rewritten = rewrite_onnx(graph, folder / "plugins.onnx")
    note = f"plugin graph, {sum(rewritten.counts.values())} plugin nodes"
    if rewritten.declined:
        note += f", {len(rewritten.declined)} layers left standard"
    return folder / "plugins.onnx", rewritten.seconds, note


def _bench_rtx(graph, folder: Path, images, reference, multiple, warmup, runs) -> BenchRow:
    """TensorRT for RTX: the plugin graph's engine for this machine's GPU, timed; without an RTX GPU,
    built for ``settings.BENCH_RTX_TARGET`` and listed as built, not run."""
    from exporter.backends.tensorrt import EngineOptions
    from exporter.backends.tensorrt_rtx import TARGETS, RTXEngineRunner, build_engine, gpu_arch

    batch = images.shape[0]
    graph, setup, note = _plugin_graph(graph, folder)
    here = gpu_arch()
    target = here if here in TARGETS else settings.BENCH_RTX_TARGET
    options = EngineOptions(min_batch=batch, opt_batch=batch, max_batch=batch)
    with phase(log, f"Building the TensorRT for RTX engine for sm_{target}"):
        built = build_engine(graph, folder / "rtx.engine", target, options, batch_multiple=multiple)
    setup += built.seconds
    note += f" ({sum(built.plugin_layers.values())} plugin layers in the engine, sm_{target})"
    if here not in TARGETS:
        why = "no GPU here" if here is None else f"this GPU is sm_{here}, not an RTX target"
        return BenchRow(TENSORRT_RTX, batch, setup_s=setup, status=BUILT, note=f"{note}; not run: {why}", device="cuda")
    feeds = {image_input(read_header(graph)).name: images}
    with RTXEngineRunner(built.path) as runner:
        row = _timed_row(TENSORRT_RTX, batch, lambda: runner.infer(feeds), setup, reference, warmup, runs, note=note)
    row.device = "cuda"
    return row


def _bench_tensorrt(name, graph, folder: Path, images, reference, multiple, warmup, runs) -> BenchRow:
    from exporter.backends.tensorrt import EngineOptions, EngineRunner, build_engine

    batch, setup, note = images.shape[0], 0.0, "portable graph"
    if name == TENSORRT_PLUGINS:
        graph, setup, note = _plugin_graph(graph, folder)
    input_name = image_input(read_header(graph)).name
    engine = folder / f"{name}.engine"
    options = EngineOptions(precision=Precision.FP32, min_batch=batch, opt_batch=batch, max_batch=batch)
    built = build_engine(graph, engine, options, input_shape=images.shape[1:], batch_multiple=multiple)
    setup += built.seconds
    if built.plugin_layers:
        note += f" ({sum(built.plugin_layers.values())} plugin layers in the engine)"
    with EngineRunner(engine) as runner:
        feeds = {input_name: torch.from_numpy(images).cuda()}  # on the device, like the CUDA PyTorch rows

        def run():
            out = runner.infer_on_device(feeds)
            torch.cuda.synchronize()
            return out

        row = _timed_row(name, batch, run, setup, reference, warmup, runs, note=note)
    row.device = "cuda"
    return row


__all__ = ["BACKENDS", "BenchReport", "BenchRow", "bench", "parse_backends", "percentile", "time_runs"]
