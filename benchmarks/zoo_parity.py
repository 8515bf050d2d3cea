"""Export and validate every zoo model through the CLI, then rewrite it into plugin nodes and validate
that too, one process per step; print a table of time, peak memory, output error, routing agreement
and plugin replacements.

    python benchmarks/zoo_parity.py                    # all zoo models (about 12 minutes, 16 GB peak)
    python benchmarks/zoo_parity.py vmoe-tiny soft-moe-tiny
    python benchmarks/zoo_parity.py --precision fp16   # the FP16 graphs (export --precision fp16), idem bf16

The routing column is the lowest share of agreeing routing decisions in any layer (expert and kept;
FP32 also needs the same buffer slots); "flips" counts the flipped decisions of both graphs' reports and
"unexplained" those their gates do not explain (exporter.compare.explain_flips).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.sources.zoo import ZOO  # noqa: E402


def run(args: list[str]) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS in GiB) of one CLI process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(proc.stderr.read().decode(), file=sys.stderr)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20


def main() -> None:
    args = sys.argv[1:]
    precision = "fp32"
    if "--precision" in args:
        i = args.index("--precision")
        precision = args[i + 1]
        del args[i : i + 2]
    names = args or list(ZOO)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name in names:
            graph, report = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.json"
            plugins, plan = Path(tmp) / f"{name}.plugins.onnx", Path(tmp) / f"{name}.rewrite.json"
            plugin_report = Path(tmp) / f"{name}.plugins.json"
            rc_e, t_e, m_e = run(
                ["export", "--model", name, "--routing-outputs", "--precision", precision, "-o", str(graph)]
            )
            rc_v, t_v, m_v = run(["validate", str(graph), "--json", str(report)]) if rc_e == 0 else (rc_e, 0, 0)
            rc_r, t_r, m_r = (
                run(["rewrite", str(graph), "-o", str(plugins), "--json", str(plan)]) if rc_e == 0 else (rc_e, 0, 0)
            )
            rc_p, t_p, m_p = (
                run(["validate", str(plugins), "--json", str(plugin_report)]) if rc_r == 0 else (rc_r, 0, 0)
            )
            row = dict(name=name, export=(t_e, m_e), validate=(t_v, m_v), rewrite=(t_r, m_r), plugins=(t_p, m_p))
            for key, path in (("portable", report), ("plugin", plugin_report)):
                data = json.loads(path.read_text()) if path.exists() else {}
                share = "agreement" if precision == "fp32" else "decisions"
                row[key] = (
                    max((o["max_rel"] for o in data.get("outputs", [])), default=float("nan")),
                    min((r[share] for r in data.get("routing", [])), default=None),
                )
                row.setdefault("flips", [0, 0])
                row["flips"][0] += sum(r.get("flip_count", 0) for r in data.get("routing", []))
                row["flips"][1] += sum(r.get("unexplained", 0) for r in data.get("routing", []))
                row["batch"] = data.get("batch", row.get("batch", 0))
            rewrite = json.loads(plan.read_text()) if plan.exists() else {"counts": {}, "layers": []}
            layers = len(rewrite["layers"])
            row["replaced"] = f"{sum(rewrite['counts'].values())}/{3 * layers}" if layers else "-"
            row["rc"] = max(rc_v, rc_p, 0 if layers and not any(not x["replaced"] for x in rewrite["layers"]) else 1)
            rows.append(row)
            for f in Path(tmp).glob(f"{name}.*onnx*"):
                f.unlink()
            print(f"  done {name}", file=sys.stderr)
    print(f"precision: {precision}")
    print(
        f"{'model':<20} {'export s':>9} {'validate s':>11} {'rewrite s':>10} {'validate s':>11} {'peak GiB':>9} "
        f"{'batch':>6} {'portable err':>13} {'plugin err':>11} {'routing':>8} {'flips':>6} {'unexpl.':>7} "
        f"{'plugins':>8} {'result':>7}"
    )
    for r in rows:
        agreement = [a for _, a in (r["portable"], r["plugin"]) if a is not None]
        routing = "n/a" if not agreement else f"{min(agreement):.2%}"
        peak = max(m for _, m in (r["export"], r["validate"], r["rewrite"], r["plugins"]))
        result = {0: "pass", 1: "FAIL", 2: "error"}.get(r["rc"], str(r["rc"]))
        print(
            f"{r['name']:<20} {r['export'][0]:>9.1f} {r['validate'][0]:>11.1f} {r['rewrite'][0]:>10.1f} "
            f"{r['plugins'][0]:>11.1f} {peak:>9.1f} {r['batch']:>6} {r['portable'][0]:>13.1e} "
            f"{r['plugin'][0]:>11.1e} {routing:>8} {r['flips'][0]:>6} {r['flips'][1]:>7} {r['replaced']:>8} {result:>7}"
        )


if __name__ == "__main__":
    main()
