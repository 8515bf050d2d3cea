"""Other authors' MoE layers (samples/04_your_own_moe) against moe-export's own tiny models: how long
``moe-export export`` takes (one process each, as a user runs it), and how long the rewrite takes to find
and check each layer (its probe: ONNX Runtime runs at two batches or more, the semantics search).

    python benchmarks/foreign_moe.py

The bar (issue 20): a foreign tiny model exports in at most 2x the time of a zoo model of the same size
(vmoe-tiny for top-k layers, soft-moe-tiny for Soft-MoE), and the probe takes at most 10 s per layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = "samples/04_your_own_moe"
MODELS = [
    ("vmoe-tiny", ["--model", "vmoe-tiny"]),
    ("soft-moe-tiny", ["--model", "soft-moe-tiny"]),
    *[
        (spec, ["--module", f"{SAMPLE}/{spec}", "--input-shape", "2,3,32,32"])
        for spec in (
            "lucidrains_moe.py:build",
            "st_moe.py:build",
            "deepspeed_moe.py:top1",
            "deepspeed_moe.py:top2",
            "bwconrad_soft_moe.py:build",
            "lucidrains_soft_moe.py:build",
            "cumsum_moe.py:top1",
            "cumsum_moe.py:top2",
            "loop_moe.py:top1",
            "loop_moe.py:top2",
        )
    ],
]


def export(args: list[str], dest: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    report = dest.with_suffix(".json")
    done = subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", "export", *args, "-o", str(dest), "--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"export {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1]}")
    return seconds, json.loads(report.read_text())


def plan(path: Path) -> tuple[float, int, str]:
    from exporter.rewrite.rewrite import plan_rewrite

    start = time.perf_counter()
    _, _, plans = plan_rewrite(path)
    seconds = time.perf_counter() - start
    replaced = [p for p in plans if p.replaced]
    return seconds, len(replaced), (replaced[0].family if replaced else "-")


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in MODELS:
            dest = Path(tmp) / f"{len(rows)}.onnx"
            seconds, report = export(args, dest)
            found, layers, family = plan(dest)
            rows.append((name, seconds, report, found, layers, family))
    base = {"vmoe": rows[0][1], "soft_moe": rows[1][1]}
    header = (
        f"{'model':30} {'export s':>9} {'x zoo':>6} {'notes':>6} {'rewrite plan s':>15} {'layers':>6} {'s/layer':>8}"
    )
    print(header)
    for name, seconds, report, found, layers, family in rows:
        ratio = seconds / base[family] if family in base else float("nan")
        notes = len(report.get("notes", []))
        per_layer = found / layers if layers else float("nan")
        print(f"{name:30} {seconds:9.1f} {ratio:6.2f} {notes:6d} {found:15.1f} {layers:6d} {per_layer:8.1f}")


if __name__ == "__main__":
    main()
