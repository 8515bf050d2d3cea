"""Build times of TensorRT for RTX engines on this machine (no GPU needed): each case's graph is exported
(and rewritten) through the CLI, then ``moe-export build engine GRAPH --backend tensorrt-rtx`` builds it
for one target as its own process; the table gives the build's wall time (the command: parse, the
plugins' kernels compiled to PTX by Triton, build, checks) and that of the build itself (the child
process: parse, kernels, build; as the report's ``seconds``), the engine's size, its plugin and FP32
layers, and the peak RSS of the command (the CLI and its build child).

    python benchmarks/rtx_builds.py                  # the tiny models and V-MoE S/32, for sm_89
    python benchmarks/rtx_builds.py --target sm_120  # another target
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

# (model, precision, graph): "plugins" builds the plugin graph, "portable" the exported graph
CASES = [
    ("vmoe-tiny", "fp32", "plugins"),
    ("vmoe-tiny", "fp16", "plugins"),
    ("vmoe-tiny", "fp32", "portable"),
    ("soft-moe-tiny", "fp32", "plugins"),
    ("soft-moe-tiny", "bf16", "plugins"),
    ("vmoe-s32-last2-e8", "fp32", "plugins"),
    ("vmoe-s32-last2-e8", "fp32", "portable"),
]


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB of the process and its children) of one CLI process; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"moe-export {' '.join(args)} failed:\n{proc.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 2**20


def main() -> None:
    args = sys.argv[1:]
    target = args[args.index("--target") + 1] if "--target" in args else "sm_89"
    print(
        f"{'model':<20}{'precision':>10}{'graph':>10}{'target':>8}{'command s':>11}{'build s':>9}{'MiB':>7}"
        f"{'plugins':>9}{'fp32 layers':>12}{'peak GiB':>10}"
    )
    with tempfile.TemporaryDirectory(prefix="moe-export-rtx-builds-") as tmp:
        for model, precision, kind in CASES:
            graph = Path(tmp) / f"{model}.{precision}.onnx"
            if not graph.exists():
                run(["export", "--model", model, "--routing-outputs", "--precision", precision, "-o", str(graph)])
            if kind == "plugins":
                rewritten = graph.with_suffix(".plugins.onnx")
                if not rewritten.exists():
                    run(["rewrite", str(graph), "-o", str(rewritten)])
                graph = rewritten
            out, report = Path(tmp) / f"{model}.{precision}.{kind}", Path(tmp) / "report.json"
            seconds, peak = run(
                ["build", "engine", str(graph), "--backend", "tensorrt-rtx", "--target", target,
                 "-o", str(out), "--json", str(report)]
            )  # fmt: skip
            (engine,) = json.loads(report.read_text())["engines"]
            plugins = sum(engine["plugin_layers"].values())
            fp32 = "-" if engine["fp32_layers"] is None else engine["fp32_layers"]
            print(
                f"{model:<20}{precision:>10}{kind:>10}{target:>8}{seconds:>11.1f}{engine['seconds']:>9.1f}"
                f"{engine['size_bytes'] / 2**20:>7.1f}{plugins:>9}{fp32:>12}{peak:>10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
