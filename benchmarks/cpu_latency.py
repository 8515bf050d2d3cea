"""CPU benchmark: export time, and ONNX Runtime vs PyTorch eager latency on the same inputs.

    python benchmarks/cpu_latency.py                      # V-MoE S/32 and Soft-MoE S/16, batch 8
    python benchmarks/cpu_latency.py --model vmoe-tiny --batch 16 --runs 20

Prints a table (median and p90 over ``--runs`` timed runs after ``--warmup`` runs); not a test. The
timing is ``exporter.tools.bench`` (``moe-export bench``, which also covers torch.compile, ONNX Runtime
CUDA and TensorRT); this script keeps the one-line-per-model comparison over several models.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter import settings  # noqa: E402
from exporter.sources.loading import from_zoo  # noqa: E402
from exporter.tools.bench import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="zoo model (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=settings.BENCH_WARMUP)
    parser.add_argument("--runs", type=int, default=settings.BENCH_RUNS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    models = args.model or ["vmoe-s32-last2-e8", "soft-moe-s16-e128"]
    reports = []
    for name in models:
        reports.append(
            bench(
                from_zoo(name),
                batch=args.batch,
                warmup=args.warmup,
                runs=args.runs,
                backends=["torch-eager", "onnxruntime-cpu"],
                threads=args.threads,
                device="cpu",
            )
        )
        print(f"  done {name}", file=sys.stderr)
    m = reports[0].machine
    print(
        f"# {m['cpu']}, {args.threads} threads, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"batch {args.batch}, median of {args.runs} runs"
    )
    print(
        f"{'model':<20} {'export s':>9} {'torch ms':>9} {'p90':>7} {'ORT ms':>8} {'p90':>7} "
        f"{'ORT speed-up':>13} {'max rel err':>12}"
    )
    for r in reports:
        torch_row, ort_row = r.row("torch-eager"), r.row("onnxruntime-cpu")
        if ort_row.status != "ok":
            print(f"{r.model:<20} ONNX Runtime {ort_row.status}: {ort_row.note}")
            continue
        print(
            f"{r.model:<20} {r.export_s:>9.1f} {torch_row.median_ms:>9.1f} {torch_row.p90_ms:>7.1f} "
            f"{ort_row.median_ms:>8.1f} {ort_row.p90_ms:>7.1f} {torch_row.median_ms / ort_row.median_ms:>12.2f}x "
            f"{ort_row.max_rel_err:>12.1e}"
        )


if __name__ == "__main__":
    main()
