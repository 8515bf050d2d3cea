"""The released Swin-MoE shapes through the pipeline on this machine, with seeded weights in Swin's real
checkpoint layout: time and peak memory of every step.

For each model (default: Swin-MoE-S with 32 experts, 192 px, the released
swin_moe_small_patch4_window12_192_32expert_32gpu_22k): its zoo config with seeded weights, written as Swin's
rank-sharded saver writes it on the 32 GPUs it trained on (``X.pth.rank0`` .. ``X.pth.rank31`` and
``X.pth.master``; ``exporter.sources.checkpoints.swin_moe.write_checkpoint``, which the tests check against
Swin's own saver), then each CLI step as its own process, timed, with its peak RSS from wait4:

    import swin-moe (32 rank files + master, the released YAML) -> export (routing outputs)
    -> validate --batch 1 -> validate --batch 8 -> inspect routing -> sweep capacity

    python benchmarks/swin_moe.py [--models swin-moe-s-e32,...] [--work DIR] [--json out.json]

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RELEASED = ROOT / "tests" / "fixtures" / "swin_moe" / "released"
GPUS = 32  # the released models trained on 32 GPUs: 32 rank files


def steps(work: Path, release: str) -> list[tuple[str, list[str]]]:
    m = str(work / "model")
    config = str(RELEASED / f"{release}.yaml")
    sweep = ["sweep", "capacity", "--model", m, "--images", "8", "--factors", "1.25", "-o", str(work / "s.png")]
    return [
        ("import", ["import", "swin-moe", str(work / "ckpt" / "release.pth"), "--config", config, "-o", m]),
        ("export", ["export", "--model", m, "--routing-outputs", "-o", f"{m}.onnx"]),
        ("validate batch 1", ["validate", f"{m}.onnx", "--batch", "1"]),
        ("validate batch 8", ["validate", f"{m}.onnx", "--batch", "8"]),
        ("inspect routing", ["inspect", "routing", "--model", m, "-o", str(work / "routing.png")]),
        ("sweep capacity", sweep),
    ]


def seeded_checkpoint(name: str, prefix: Path) -> None:
    """Writes the zoo model's seeded weights as 32 rank files and a master (in a child process: this one
    stays small, so the children's peak RSS, which starts from this process's at fork, is theirs)."""
    from exporter.sources.checkpoints.swin_moe import write_checkpoint
    from exporter.sources.zoo import build_model, get_config

    config = get_config(name)
    write_checkpoint(prefix, build_model(config, seed=0).state_dict(), config, ranks=GPUS)


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
    from exporter.sources.zoo import get_config, param_count

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="swin-moe-s-e32")
    parser.add_argument("--work", help="Keep the files here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="Also write the rows as JSON")
    parser.add_argument("--write", nargs=2, metavar=("MODEL", "PREFIX"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.write:
        seeded_checkpoint(ns.write[0], Path(ns.write[1]))
        return 0
    rows, failed = [], False
    for name in ns.models.split(","):
        config = get_config(name)
        release = config.tags[1]
        work = Path(ns.work or tempfile.mkdtemp(prefix="moe-swin-")) / name
        shutil.rmtree(work, ignore_errors=True)
        (work / "ckpt").mkdir(parents=True)
        rc, write_s, _ = timed(["--write", name, str(work / "ckpt" / "release.pth")], work / "log.txt")
        if rc:
            raise SystemExit(f"writing the seeded checkpoint failed: see {work / 'log.txt'}")
        size = sum(f.stat().st_size for f in (work / "ckpt").iterdir()) / 2**30
        row = {"model": name, "parameters": param_count(config), "checkpoint_gib": round(size, 2), "steps": {}}
        print(f"{name}: {row['parameters'] / 1e6:.1f}M parameters, {GPUS} rank files + master ({size:.2f} GiB) "
              f"written in {write_s:.1f}s", flush=True)  # fmt: skip
        for step, args in steps(work, release):
            if any(s["rc"] != 0 for s in row["steps"].values()):
                row["steps"][step] = {"rc": None}
                continue
            rc, seconds, rss = timed(args, work / "log.txt")
            row["steps"][step] = {"rc": rc, "seconds": round(seconds, 1), "peak_rss_gib": round(rss, 2)}
            print(f"  {step:17s} rc={rc} {seconds:7.1f} s {rss:6.2f} GiB", flush=True)
        onnx = [f for f in work.glob("model.onnx*") if f.is_file()]
        row["graph_gib"] = round(sum(f.stat().st_size for f in onnx) / 2**30, 2) if onnx else None
        failed_here = any(s["rc"] != 0 for s in row["steps"].values())
        failed |= failed_here
        rows.append(row)
        if failed_here:
            print(f"  log: {work / 'log.txt'}")
        if not ns.work:
            shutil.rmtree(work.parent, ignore_errors=True)
    names = [s for s, _ in steps(Path("."), "")]
    print("\n| model | params | checkpoint | " + " | ".join(names) + " | graph |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
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
            f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['checkpoint_gib']} GiB | "
            + " | ".join(cells)
            + f" | {row['graph_gib']} GiB |"
        )
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
