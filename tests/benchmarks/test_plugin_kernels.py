"""benchmarks/plugin_kernels.py runs on a GPU only; its target arithmetic is checked here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plugin_kernels.py"


def _module():
    spec = importlib.util.spec_from_file_location("plugin_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(step, impl, us, nbytes=0, shape="B/16 224px G=8", dtype="fp16"):
    return dict(step=step, impl=impl, us=us, bytes=nbytes, shape=shape, dtype=dtype)


def test_targets_from_timings():
    bench = _module()
    rows = [
        row("TopKRoute (BPR)", "plugin", 10.0),
        row("TopKDispatch", "plugin", 20.0, nbytes=60_000_000),  # 3 TB/s
        row("TopKCombine", "plugin", 20.0, nbytes=60_000_000),
        row("TopKRoute (BPR)", "compile", 50.0),
        row("TopKDispatch", "compile", 30.0),
        row("TopKCombine", "compile", 30.0),
        row("SoftRoute", "plugin", 1.0, shape="S/16"),
    ]
    bandwidth, speed = bench.targets(rows, copy_gbps=4000.0)
    assert bandwidth["value"] == 0.75 and bandwidth["met"]  # 3000 of 4000 GB/s
    assert speed["value"] == 2.2 and speed["met"]  # 110 us against 50 us
    slow = [dict(r, us=r["us"] * 2) if r["impl"] == "plugin" else r for r in rows]
    assert [t["met"] for t in bench.targets(slow, copy_gbps=4000.0)] == [False, False]
    no_compile = [r for r in rows if r["impl"] != "compile"]
    assert [t["target"].split()[0] for t in bench.targets(no_compile, 4000.0)] == ["dispatch+combine"]


def test_every_released_group_size_is_benchmarked():
    bench = _module()
    assert [(g, 8 * t) for g, t, _ in bench.GROUPS] == [("224px", 1576), ("384px", 4616)]
