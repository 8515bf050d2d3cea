"""Export and validate every zoo model through the CLI, one process per step, and print a table of
time, peak memory, output error and routing agreement.

    python benchmarks/zoo_parity.py                    # all zoo models (about 6 minutes, 16 GB peak)
    python benchmarks/zoo_parity.py vmoe-tiny soft-moe-tiny
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

from exporter.zoo import ZOO  # noqa: E402


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
    names = sys.argv[1:] or list(ZOO)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name in names:
            graph, report = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.json"
            rc_e, t_e, m_e = run(["export", "--model", name, "--routing-outputs", "-o", str(graph)])
            rc_v, t_v, m_v = run(["validate", str(graph), "--json", str(report)]) if rc_e == 0 else (rc_e, 0, 0)
            data = json.loads(report.read_text()) if report.exists() else {}
            agreement = min((r["agreement"] for r in data.get("routing", [])), default=None)
            rel = max((o["max_rel"] for o in data.get("outputs", [])), default=float("nan"))
            rows.append((name, t_e, m_e, t_v, m_v, data.get("batch", 0), rel, agreement, rc_v))
            for f in Path(tmp).glob(f"{name}.onnx*"):
                f.unlink()
            print(f"  done {name}", file=sys.stderr)
    print(
        f"{'model':<20} {'export s':>9} {'peak GiB':>9} {'validate s':>11} {'peak GiB':>9} {'batch':>6} "
        f"{'max rel err':>12} {'routing':>8} {'result':>7}"
    )
    for name, t_e, m_e, t_v, m_v, batch, rel, agree, rc in rows:
        routing = "n/a" if agree is None else f"{agree:.2%}"
        result = {0: "pass", 1: "FAIL", 2: "error"}.get(rc, str(rc))
        print(
            f"{name:<20} {t_e:>9.1f} {m_e:>9.1f} {t_v:>11.1f} {m_v:>9.1f} {batch:>6} {rel:>12.1e} "
            f"{routing:>8} {result:>7}"
        )


if __name__ == "__main__":
    main()
