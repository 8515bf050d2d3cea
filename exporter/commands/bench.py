"""``moe-export bench``: latency and throughput on every backend."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import console, emit, escape
from exporter.commands.options import COUNT, NON_NEGATIVE, json_option, model_options
from exporter.commands.render import print_notes


@click.command()
@model_options
@click.option("--batch", type=COUNT, help="Images per run (a multiple of the routing group). Default: one group, or 8.")
@click.option(
    "--warmup", type=NON_NEGATIVE, default=settings.BENCH_WARMUP, show_default=True, help="Untimed runs first."
)
@click.option("--runs", type=COUNT, default=settings.BENCH_RUNS, show_default=True, help="Timed runs per backend.")
@click.option(
    "--backends",
    default="all",
    show_default=True,
    help="Comma-separated: torch-eager, torch-compile, onnxruntime-cpu, onnxruntime-cuda, tensorrt, tensorrt-plugins, "
    "tensorrt-rtx (built, and run on an RTX GPU).",
)
@click.option("--threads", type=COUNT, help="PyTorch and ONNX Runtime intra-op threads. Default: every CPU core.")
@json_option("the rows")
def bench(choice, batch, warmup, runs, backends, threads, json_out):
    """Latency and throughput of one model on every backend this machine has: PyTorch eager,
    torch.compile, ONNX Runtime (CPU, CUDA) and TensorRT engines of the portable and the plugin graph.

    Median and p90 of the timed runs, images/s at the median, setup time (compile, export, engine
    build) and the max relative error of each backend's output against eager. Backends the machine
    lacks are listed as skipped with the reason; torch.compile is slow to compile on CPU (leave it
    out with --backends).

    \b
    Examples:
      moe-export bench --model vmoe-s32-last2-e8 --batch 8
      moe-export bench --model soft-moe-tiny --backends torch-eager,onnxruntime-cpu --runs 20 --json -
    """
    from exporter.commands.choice import resolve
    from exporter.tools.bench import bench as run_bench

    source, batch = resolve(choice), choice.batch if batch is None else batch
    report = run_bench(source, batch=batch, warmup=warmup, runs=runs, backends=backends, threads=threads)
    emit(report, _print_bench, json_out)


def _print_bench(report) -> None:
    from rich.table import Table

    out = console()
    m = report.machine
    out.print(
        f"[bold]{escape(report.model)}[/bold], batch {report.batch}, {report.warmup} warm-up + {report.runs} timed "
        f"runs; {escape(m['cpu'])}, {escape(m['gpu'] or 'no GPU')}; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, TensorRT {m['tensorrt'] or '-'}; {report.threads} threads"
    )

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    table = Table(box=None, pad_edge=False)
    for col in ("backend", "device", "batch", "median ms", "p90 ms", "images/s", "setup s", "max rel err", "note"):
        table.add_column(col, justify="left" if col in ("backend", "device", "note") else "right")
    for r in report.rows:
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        table.add_row(
            r.backend,
            r.device,
            str(r.batch),
            num(r.median_ms, ".2f"),
            num(r.p90_ms, ".2f"),
            num(r.images_per_s, ",.1f"),
            num(r.setup_s, ".1f"),
            num(r.max_rel_err, ".1e"),
            escape(note),
        )
    out.print(table)
    print_notes(report.notes)
