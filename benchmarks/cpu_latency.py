"""CPU benchmark: export time, and ONNX Runtime vs PyTorch eager latency on the same inputs.

    python benchmarks/cpu_latency.py                      # V-MoE S/32 and Soft-MoE S/16, batch 8
    python benchmarks/cpu_latency.py --model vmoe-tiny --batch 16 --runs 20

Prints a table (median and p90 over ``--runs`` timed runs after ``--warmup`` runs); not a test.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exporter.export import export_onnx  # noqa: E402
from exporter.source import from_zoo, load  # noqa: E402


def timed(fn, warmup: int, runs: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def _time_torch(module, x, warmup, runs):
    with torch.inference_mode():
        med, p90 = timed(lambda: module(x), warmup, runs)
        return med, p90, module(x).numpy()


def _time_ort(session, images, warmup, runs):
    feed = {session.get_inputs()[0].name: images}
    med, p90 = timed(lambda: session.run(None, feed), warmup, runs)
    return med, p90, session.run(None, feed)[0]


def bench(name: str, batch: int, warmup: int, runs: int, threads: int, folder: Path) -> dict:
    import onnxruntime as ort

    source = from_zoo(name)
    loaded = load(source)
    path = folder / f"{name}.onnx"
    result = export_onnx(loaded, path)
    images = np.random.default_rng(0).standard_normal((batch, *source.input_shape), dtype=np.float32)
    torch_med, torch_p90, expected = _time_torch(loaded.module, torch.from_numpy(images), warmup, runs)
    del loaded  # free PyTorch's weights before ONNX Runtime loads its own
    gc.collect()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ort_med, ort_p90, actual = _time_ort(session, images, warmup, runs)
    err = float(np.abs(actual - expected).max() / np.abs(expected).max())
    del session
    gc.collect()
    return dict(
        model=name,
        batch=batch,
        export_s=result.seconds,
        torch_ms=torch_med * 1e3,
        torch_p90_ms=torch_p90 * 1e3,
        ort_ms=ort_med * 1e3,
        ort_p90_ms=ort_p90 * 1e3,
        speedup=torch_med / ort_med,
        max_rel_err=err,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="zoo model (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    models = args.model or ["vmoe-s32-last2-e8", "soft-moe-s16-e128"]
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}, batch {args.batch}, median of {args.runs} runs"
    )
    header = (
        f"{'model':<20} {'export s':>9} {'torch ms':>9} {'p90':>7} {'ORT ms':>8} {'p90':>7} "
        f"{'ORT speed-up':>13} {'max rel err':>12}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            r = bench(name, args.batch, args.warmup, args.runs, args.threads, Path(tmp))
            rows.append(r)
            print(f"  done {name}", file=sys.stderr)
    print(header)
    for r in rows:
        print(
            f"{r['model']:<20} {r['export_s']:>9.1f} {r['torch_ms']:>9.1f} {r['torch_p90_ms']:>7.1f} "
            f"{r['ort_ms']:>8.1f} {r['ort_p90_ms']:>7.1f} {r['speedup']:>12.2f}x {r['max_rel_err']:>12.1e}"
        )


if __name__ == "__main__":
    main()
