"""Prepare the GPU run: the wheels the GPU test machine lacks, the size check, the command to send.

    python benchmarks/gpu_wheels.py            # downloads into .whl/ (ignored by git), prints the plan
    python benchmarks/gpu_wheels.py --json -   # the same as JSON

The GPU machine (one H200, no network; see the device notes) has Python 3.12, torch 2.11, triton 3.6,
onnx 1.23.1, onnxruntime 1.30.0, onnxscript 0.7.2, onnx-ir 1.0.0, numpy 2.5, msgpack and the rest of
moe-export's dependencies, but not onnx-graphsurgeon and polygraphy: exactly those two are downloaded,
for CPython 3.12 on manylinux x86_64, without their dependencies. The working tree that travels
(tracked files plus untracked files git does not ignore) plus the wheels must stay well under the
64 MiB a run may carry; the script exits 1 when they do not, or when a download fails.

Then send the printed command (under 2,000 characters) with ``carry: [".whl"]`` and the printed
timeout; ``benchmarks/gpu_checks.sh`` installs the wheels offline first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISSING_ON_GPU = ("onnx-graphsurgeon", "polygraphy")  # every other dependency is installed there
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT_MIB = 64
HEADROOM_MIB = 48  # "well under": leave room for the run's own files
CHECKS_BUDGET_S = 330  # benchmarks/gpu_checks.sh's default budget
TIMEOUT_S = 360  # the run's timeout_s: two runs and two machine starts fit in 15 minutes
COMMAND = (
    "set -o pipefail; nvidia-smi -L; "
    "GPU_CHECKS_WHEELS=.whl GPU_CHECKS_BUDGET_S={budget} OUT=$OUT/checks PYTHON=python3 "
    "bash benchmarks/gpu_checks.sh 2>&1 | tail -c 200000 > $OUT/gpu_checks.log; rc=$?; "
    "cd $OUT/checks && tar czf $OUT/results.tgz --exclude='*.engine' --exclude='*.onnx*' . ; "
    "cat summary.txt; exit $rc"
)


def download(dest: Path) -> list[Path]:
    dest.mkdir(exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={version(name)}" for name in MISSING_ON_GPU]  # the versions this checkout is tested with
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    command += ["--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), *pins]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(
            f"pip download failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}"
        )
    return sorted(dest.glob("*.whl"))


def tree_bytes() -> int:
    """Bytes of what a run sends: tracked files and untracked files that git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(ROOT / ".whl"))
    parser.add_argument("--json", help="write the plan as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    wheels = download(Path(args.dest))
    if sorted(w.name.split("-")[0].replace("_", "-").lower() for w in wheels) != sorted(MISSING_ON_GPU):
        raise SystemExit(f"expected one wheel each of {MISSING_ON_GPU}, got {[w.name for w in wheels]}")
    tree, wheel_bytes = tree_bytes(), sum(w.stat().st_size for w in wheels)
    total_mib = (tree + wheel_bytes) / 2**20
    command = COMMAND.format(budget=CHECKS_BUDGET_S)
    plan = {
        "wheels": {w.name: w.stat().st_size for w in wheels},
        "tree_mib": round(tree / 2**20, 2),
        "wheels_mib": round(wheel_bytes / 2**20, 2),
        "total_mib": round(total_mib, 2),
        "limit_mib": CARRY_LIMIT_MIB,
        "carry": [".whl"],
        "command": command,
        "command_chars": len(command),
        "timeout_s": TIMEOUT_S,
        "ok": total_mib < HEADROOM_MIB and len(command) < 2000,
    }
    if args.json:
        text = json.dumps(plan, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text + "\n")
    if args.json != "-":
        for name, size in plan["wheels"].items():
            print(f"wheel    {name} ({size / 1024:.0f} KiB)")
        print(f"tree     {plan['tree_mib']} MiB + wheels {plan['wheels_mib']} MiB = {plan['total_mib']} MiB "
              f"(limit {CARRY_LIMIT_MIB} MiB; want under {HEADROOM_MIB})")  # fmt: skip
        print(f"carry    {plan['carry']}")
        print(f"timeout  {TIMEOUT_S} s (gpu_checks.sh budget {CHECKS_BUDGET_S} s)")
        print(f"command  ({len(command)} characters)\n{command}")
    return 0 if plan["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
