"""The released V-MoE models through the whole pipeline on this machine, with seeded weights in each
model's real parameter tree: time and peak memory of every step.

For each released config: a vmoe-format checkpoint of its tree (names and shapes from
tests/fixtures/vmoe/released_trees.json, which vmoe's own configs gave) with seeded weights, then
each CLI step as its own process, timed, with its peak RSS from wait4:

    import vmoe -> export (routing outputs) -> validate -> rewrite -> validate (plugins)
    -> build bundle -> inspect routing -> sweep capacity

    python benchmarks/released_models.py [--models vmoe-s32-last2-ilsvrc2012,...] [--work DIR] [--json out.json]

A failing step stops that model's row (the rest are marked not run) and the script exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TREES = ROOT / "tests" / "fixtures" / "vmoe" / "released_trees.json"
RELEASES = {
    "vmoe-s32-last2-ilsvrc2012": "vmoe_s32_last2_ilsvrc2012_randaug_light1",
    "vmoe-s32-last2-ilsvrc2012-ft-384": "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012",
    "vmoe-b16-in21k": "vmoe_b16_imagenet21k_randaug_strong",
    "vmoe-b16-in21k-ft-ilsvrc2012-384": "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012",
}


def steps(work: Path) -> list[tuple[str, list[str]]]:
    m = str(work / "model")
    return [
        ("import", ["import", "vmoe", str(work / "ckpt" / "release"), "-o", m]),
        ("export", ["export", "--model", m, "--routing-outputs", "-o", f"{m}.onnx"]),
        ("validate", ["validate", f"{m}.onnx"]),
        ("rewrite", ["rewrite", f"{m}.onnx", "-o", f"{m}.plugins.onnx"]),
        ("validate plugins", ["validate", f"{m}.plugins.onnx"]),
        ("build bundle", ["build", "bundle", "--model", m, "-o", str(work / "bundle")]),
        ("inspect routing", ["inspect", "routing", "--model", m, "-o", str(work / "routing.png")]),
        (
            "sweep capacity",
            ["sweep", "capacity", "--model", m, "--images", "8", "--factors", "1", "-o", str(work / "s.png")],
        ),
    ]


def seeded_checkpoint(release: str, prefix: Path) -> int:
    """Writes the release's tree with seeded weights (run in a child process: this one stays small,
    so the children's peak RSS, which starts from this process's at fork, is theirs)."""
    from exporter.sources.checkpoints.vmoe_format import write_checkpoint

    shapes = json.loads(TREES.read_text())[release]["params"]
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in shapes.items():
        fan_in = shape[0] if len(shape) > 1 else 1
        params[name] = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)
    write_checkpoint(prefix, params, shards=4)
    return sum(a.size for a in params.values())


def timed(args: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS in GiB) of one CLI step in its own process."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ moe-export {' '.join(args)}\n".encode())
        out.flush()
        command = [sys.executable, "-m", "cli", *args] if args[0] != "--write" else [sys.executable, __file__, *args]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(RELEASES))
    parser.add_argument("--work", help="Keep the files here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="Also write the rows as JSON")
    parser.add_argument("--write", nargs=2, metavar=("RELEASE", "PREFIX"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.write:
        seeded_checkpoint(*ns.write[:1], Path(ns.write[1]))
        return 0
    rows, failed = [], False
    for name in ns.models.split(","):
        work = Path(ns.work or tempfile.mkdtemp(prefix="moe-release-")) / name
        shutil.rmtree(work, ignore_errors=True)
        (work / "ckpt").mkdir(parents=True)
        shapes = json.loads(TREES.read_text())[RELEASES[name]]["params"].values()
        params = sum(int(np.prod(s)) for s in shapes)
        rc, write_s, write_rss = timed(["--write", RELEASES[name], str(work / "ckpt" / "release")], work / "log.txt")
        if rc:
            raise SystemExit(f"writing the seeded checkpoint failed: see {work / 'log.txt'}")
        row = {"model": name, "parameters": params, "checkpoint_write_s": round(write_s, 1), "steps": {}}
        print(f"{name}: {params / 1e6:.1f}M parameters, seeded checkpoint written in {write_s:.1f}s", flush=True)
        for step, args in steps(work):
            if failed_here := any(s["rc"] != 0 for s in row["steps"].values()):
                row["steps"][step] = {"rc": None}
                continue
            rc, seconds, rss = timed(args, work / "log.txt")
            row["steps"][step] = {"rc": rc, "seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2)}
            print(f"  {step:17s} rc={rc} {seconds:7.1f} s {rss:6.2f} GiB", flush=True)
        failed_here = any(s["rc"] != 0 for s in row["steps"].values())
        failed |= failed_here
        bundle = work / "bundle"
        row["bundle_gib"] = (
            round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**30, 2)
            if bundle.exists()
            else None
        )
        rows.append(row)
        if failed_here:
            print(f"  log: {work / 'log.txt'}")
        if not ns.work:
            shutil.rmtree(work.parent, ignore_errors=True)
    names = [s for s, _ in steps(Path("."))]
    print("\n| model | params | " + " | ".join(names) + " | bundle |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for row in rows:
        cells = []
        for s in names:
            r = row["steps"][s]
            cells.append(
                "not run"
                if r["rc"] is None
                else f"{r['seconds']:.0f} s, {r['peak_rss_gib']:.1f} GiB" + ("" if r["rc"] == 0 else f" (rc {r['rc']})")
            )
        print(
            f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | "
            + " | ".join(cells)
            + f" | {row['bundle_gib']} GiB |"
        )
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
