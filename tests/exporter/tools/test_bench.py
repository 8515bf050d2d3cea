"""The benchmark: rows for every requested backend (timed, skipped with a reason, or n/a with a reason),
consistent statistics, errors against eager, and a JSON-serialisable report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from exporter.backends.tensorrt_rtx import rtx_available
from exporter.errors import UserError
from exporter.sources.loading import from_zoo
from exporter.tools.bench import (
    BACKENDS,
    NOT_AVAILABLE,
    OK,
    SKIPPED,
    bench,
    busy_elsewhere,
    parse_backends,
    percentile,
    tensorrt_reason,
    time_runs,
)

CPU_BACKENDS = ["torch-eager", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "tensorrt-plugins"]


@pytest.fixture(scope="module")
def reports():
    """vmoe-tiny at its default batch (one routing group) and soft-moe-tiny at batch 2, few runs."""
    return {
        "vmoe-tiny": bench(from_zoo("vmoe-tiny"), warmup=1, runs=3, backends=CPU_BACKENDS, threads=1),
        "soft-moe-tiny": bench(from_zoo("soft-moe-tiny"), batch=2, warmup=1, runs=3, backends=CPU_BACKENDS),
    }


@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_eager_and_onnxruntime_rows(reports, name):
    report = reports[name]
    assert report.model == name and report.batch == (8 if name == "vmoe-tiny" else 2)
    assert [r.backend for r in report.rows] == CPU_BACKENDS  # in run order
    for backend in ("torch-eager", "onnxruntime-cpu"):
        row = report.row(backend)
        assert row.status == OK and row.batch == report.batch and row.device == "cpu"
        assert row.note == "" or row.note.startswith("busy machine: other processes used")
        assert 0 < row.median_ms <= row.p90_ms
        assert row.images_per_s == pytest.approx(report.batch / (row.median_ms / 1e3))
        assert row.setup_s >= 0 and row.max_rel_err < 1e-4
    assert report.row("torch-eager").max_rel_err == 0.0  # the reference itself
    assert report.row("onnxruntime-cpu").setup_s >= report.export_s > 0  # export + session
    assert report.machine["torch"] == torch.__version__ and report.machine["onnxruntime"]
    assert report.threads >= 1 and (name != "vmoe-tiny" or report.threads == 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only rows")
def test_gpu_rows_are_skipped_with_a_reason_on_a_cpu_machine(reports):
    for report in reports.values():
        for backend in ("onnxruntime-cuda", "tensorrt", "tensorrt-plugins"):
            row = report.row(backend)
            if backend.startswith("tensorrt") or row.status == SKIPPED:
                assert row.status == SKIPPED and row.note and "\n" not in row.note
                assert row.median_ms is None and row.images_per_s is None and row.max_rel_err is None
        assert report.row("tensorrt").note == tensorrt_reason()
        assert report.machine["gpu"] is None


def test_report_is_json_serialisable(reports):
    data = json.loads(json.dumps(reports["vmoe-tiny"].to_dict()))
    assert data["model"] == "vmoe-tiny" and len(data["rows"]) == len(CPU_BACKENDS)
    row = data["rows"][1]
    assert set(row) >= {"backend", "batch", "median_ms", "p90_ms", "images_per_s", "setup_s", "status", "note"}
    assert row["backend"] == "onnxruntime-cpu" and row["max_rel_err"] < 1e-4


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 90) == 9.0 and percentile(values, 50) == 5.0 and percentile(values, 100) == 10.0
    assert percentile([1.0, 2.0, 3.0], 90) == 3.0 and percentile([4.0], 90) == 4.0


def test_time_runs_counts_warmup_and_timed_runs():
    calls = []
    times, last = time_runs(lambda: calls.append(1) or len(calls), warmup=2, runs=5)
    assert len(calls) == 7 and len(times) == 5 and last == 7 and all(t >= 0 for t in times)


def test_busy_elsewhere_sees_another_process():
    hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)  # past the interpreter's start
        result, share = busy_elsewhere(lambda: time.sleep(0.5) or "done")
    finally:
        hog.kill()
        hog.wait()
    if share is None:
        pytest.skip("no /proc/stat here")
    assert result == "done" and 0.5 / os.cpu_count() <= share <= 1.0


def test_a_failing_torch_compile_is_an_na_row_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor needs a C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    report = bench(from_zoo("soft-moe-tiny"), batch=2, warmup=0, runs=2, backends=["torch-compile", "torch-eager"])
    assert [r.backend for r in report.rows] == ["torch-eager", "torch-compile"]
    row = report.row("torch-compile")
    assert row.status == NOT_AVAILABLE and row.note == "RuntimeError: inductor needs a C++ compiler"
    assert row.median_ms is None and row.setup_s is None
    assert report.row("torch-eager").status == OK and report.export_s is None  # no ONNX backend: no export


def test_backend_names():
    assert parse_backends(None) == BACKENDS and parse_backends("all") == BACKENDS
    assert parse_backends("onnxruntime-cpu, torch-eager") == ("torch-eager", "onnxruntime-cpu")
    with pytest.raises(UserError, match="unknown backend 'tensorrt-fp8'"):
        parse_backends("torch-eager,tensorrt-fp8")
    with pytest.raises(UserError, match="unknown backend"):
        bench(from_zoo("vmoe-tiny"), backends=["onnx"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch=4), "not a multiple of the routing group"),
        (dict(runs=0), "runs >= 1"),
        (dict(threads=-1), "threads must be at least 1"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        bench(from_zoo("vmoe-tiny"), backends=["torch-eager"], **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_tensorrt_rows_on_a_gpu(name):
    backends = ["torch-eager", "onnxruntime-cpu", "tensorrt", "tensorrt-plugins"]
    report = bench(from_zoo(name), batch=8, warmup=2, runs=10, backends=backends)
    assert report.machine["gpu"] and report.machine["tensorrt"]
    assert report.row("torch-eager").device == "cuda"
    for backend in ("tensorrt", "tensorrt-plugins"):
        row = report.row(backend)
        assert row.status == OK, row.note
        assert row.device == "cuda" and 0 < row.median_ms <= row.p90_ms and math.isfinite(row.images_per_s)
        assert row.setup_s > report.export_s and row.max_rel_err < 1e-3
    assert "plugin graph" in report.row("tensorrt-plugins").note


@pytest.mark.skipif(rtx_available() is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")
def test_an_rtx_engine_is_built_and_listed_as_not_runnable_without_a_gpu():
    from exporter.backends.tensorrt_rtx import TARGETS, gpu_arch
    from exporter.tools.bench import BUILT

    if gpu_arch() in TARGETS:
        pytest.skip("an RTX GPU is here: the row is timed (rtx_gpu tests)")
    report = bench(from_zoo("soft-moe-tiny"), batch=2, warmup=0, runs=1, backends=["torch-eager", "tensorrt-rtx"])
    row = report.row("tensorrt-rtx")
    assert row.status == BUILT and row.median_ms is None and row.setup_s > report.export_s > 0
    assert "6 plugin layers in the engine, sm_89" in row.note and row.note.endswith("not run: no GPU here")
