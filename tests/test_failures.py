"""Honest failures, end to end through the CLI: the catalogue of bad inputs and faults, each with its
exit code (0 ok, 1 a check failed, 2 usage, input or environment, 3 a bug) and its one line, no
traceback, and nothing written or replaced that should not be.

Faults a test machine cannot make for real (a full disk; a read-only folder, which root writes anyway)
are injected where the write happens.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from exporter.backends.tensorrt_rtx import rtx_available

ROOT = Path(__file__).resolve().parents[1]
USER_MODULES = ROOT / "tests" / "fixtures" / "user_modules.py"


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def snapshot(folder: Path) -> dict:
    """What is in a folder: each entry's kind, size and modification time (links not followed)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[path.relative_to(folder).as_posix()] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` (its pixel data is a stub): enough for the size check,
    which must refuse it before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def graph(exported):
    """vmoe-tiny with routing outputs (8 images a group, 3x32x32 images)."""
    _, result = exported("vmoe-tiny")
    return result.path


@pytest.fixture
def scene(tmp_path, graph):
    """A folder with a graph, input files of every wrong kind, a special file and a fake huge image."""
    shutil.copy(graph, tmp_path / "v.onnx")
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "wrong_name.npz", pixels=images)
    np.savez(tmp_path / "int64.npz", images=images.astype(np.int64))
    np.savez(tmp_path / "float64.npz", images=images.astype(np.float64))
    np.savez(tmp_path / "extra.npz", images=images, labels=np.zeros(8))
    (tmp_path / "two_iterations.json").write_text(json.dumps([{}, {}]))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))  # Pillow itself refuses to open it
    (tmp_path / "large.png").write_bytes(png_header(5000, 5000))  # Pillow opens it; moe-export's limit refuses
    (tmp_path / "dir").mkdir()
    return tmp_path


# (case, arguments with {d} for the scene folder, exit code, fragment of the one line)
CATALOGUE = [
    (
        "--routing-precision reduced of an fp32 graph",
        "export --model vmoe-tiny --routing-precision reduced -o {d}/x.onnx",
        2,
        "--routing-precision reduced needs --precision fp16 or bf16",
    ),
    ("--precision int8", "export --model vmoe-tiny --precision int8 -o {d}/x.onnx", 2, "'int8' is not one of"),
    (
        "an engine in another precision than its graph",
        "build engine {d}/v.onnx --precision fp16 -o {d}/engine",
        2,
        "is typed fp32 and TensorRT builds it strongly typed",
    ),
    ("-o onto a special file", "export --model vmoe-tiny -o {d}/fifo", 2, "is a special file"),
    ("-o onto a folder", "export --model vmoe-tiny -o {d}/dir", 2, "is a directory"),
    ("--json onto a folder", "export --model vmoe-tiny -o {d}/x.onnx --json {d}/dir", 2, "is a directory"),
    ("--json onto a special file", "validate {d}/v.onnx --json {d}/fifo", 2, "is a special file"),
    ("-o of inspect onto a folder", "inspect routing --model vmoe-tiny -o {d}/dir", 2, "is a directory"),
    (
        "huge --input-shape, export",
        "export --module {m}:plain_cnn --input-shape 1,3,100000,100000 -o {d}/x.onnx",
        2,
        "10,000,000,000 pixels per image; the limit is 16,777,216",
    ),
    (
        "huge --input-shape, validate",
        "validate {d}/v.onnx --module {m}:plain_cnn --input-shape 1,3,100000,100000",
        2,
        "pixels per image",
    ),
    ("huge batch", "validate {d}/v.onnx --batch 80000000", 2, "GiB; the limit is 4 GiB"),
    (
        "20000x20000 image",
        "inspect routing --model vmoe-tiny --image {d}/huge.png -o {d}/r.png",
        2,
        "is too large (Image size (400000000 pixels) exceeds limit",
    ),
    (
        "5000x5000 image",
        "inspect routing --model vmoe-tiny --image {d}/large.png -o {d}/r.png",
        2,
        "is 5000x5000 pixels; the limit is 16,777,216",
    ),
    ("--batch -8", "validate {d}/v.onnx --batch -8", 2, "'--batch': -8 is not in the range x>=1"),
    ("--batch 0", "validate {d}/v.onnx --batch 0", 2, "'--batch': 0 is not in the range x>=1"),
    ("--input-seed -1", "validate {d}/v.onnx --input-seed -1", 2, "'--input-seed': -1 is not in the range"),
    ("--seed 1e23", "export --model vmoe-tiny --seed 1e23 -o {d}/x.onnx", 2, "'1e23' is not a valid integer"),
    ("--seed 10**23", "validate {d}/v.onnx --seed 100000000000000000000000", 2, "'--seed'"),
    (
        "--opset 99",
        "export --model vmoe-tiny --opset 99 -o {d}/x.onnx",
        2,
        "'--opset': 99 is not in the range 18<=x<=23",
    ),
    (
        "--capacity-factor 1e9",
        "export --model vmoe-tiny --capacity-factor 1e9 -o {d}/x.onnx",
        2,
        "expert activations [4, 260000000000, 64] would take",
    ),
    ("--capacity-factor 1e9, validate", "validate {d}/v.onnx --capacity-factor 1e9", 2, "would take"),
    ("--capacity-factor inf", "export --model vmoe-tiny --capacity-factor inf -o {d}/x.onnx", 2, "not a finite number"),
    ("--capacity-factor nan", "export --model vmoe-tiny --capacity-factor nan -o {d}/x.onnx", 2, "not a finite number"),
    ("--capacity-factor 0", "export --model vmoe-tiny --capacity-factor 0 -o {d}/x.onnx", 2, "not in the range 0 < x"),
    ("--capacity-factor -0.5", "export --model vmoe-tiny --capacity-factor -0.5 -o {d}/x.onnx", 2, "range 0 < x"),
    ("--k 0", "export --model vmoe-tiny --k 0 -o {d}/x.onnx", 2, "'--k': 0 is not in the range x>=1"),
    ("--group-images 0", "export --model vmoe-tiny --group-images 0 -o {d}/x.onnx", 2, "'--group-images'"),
    ("--rtol -1", "validate {d}/v.onnx --rtol -1", 2, "'--rtol': '-1' is not in the range 0 <= x"),
    ("--rtol nan", "validate {d}/v.onnx --rtol nan", 2, "'--rtol': 'nan' is not a finite number"),
    ("--min-routing-agreement 2", "validate {d}/v.onnx --min-routing-agreement 2", 2, "not in the range 0 <= x <= 1"),
    ("bench --runs 0", "bench --model vmoe-tiny --runs 0", 2, "'--runs': 0 is not in the range x>=1"),
    ("bench --warmup -1", "bench --model vmoe-tiny --warmup -1", 2, "'--warmup'"),
    ("bench --threads 0", "bench --model vmoe-tiny --threads 0", 2, "'--threads'"),
    ("sweep --images 0", "sweep capacity --model vmoe-tiny --images 0", 2, "'--images'"),
    ("sweep --factors inf", "sweep capacity --model vmoe-tiny --factors 1,inf", 2, "finite numbers above 0, not inf"),
    (
        "sweep has no --capacity-factor",
        "sweep capacity --model vmoe-tiny --capacity-factor 1",
        2,
        "No such option '--capacity-factor'",
    ),
    ("inspect --sample -1", "inspect routing --model vmoe-tiny --sample -1 -o {d}/r.png", 2, "'--sample'"),
    (
        "inspect both capacity options",
        "inspect routing --model vmoe-tiny --capacity-factor 1 --capacity-factors 1,2 -o {d}/r.png",
        2,
        "not both",
    ),
    ("inspect --slots -1", "inspect routing --model soft-moe-tiny --slots -1 -o {d}/r.png", 2, "integers >= 0"),
    ("build bundle --batch 0", "build bundle --model vmoe-tiny --batch 0 -o {d}/b", 2, "'--batch'"),
    ("--inputs with another name", "validate {d}/v.onnx --inputs {d}/wrong_name.npz", 2, "none named 'images'"),
    ("--inputs int64", "validate {d}/v.onnx --inputs {d}/int64.npz", 2, "'images' is int64; the graph takes float32"),
    ("--inputs float64", "validate {d}/v.onnx --inputs {d}/float64.npz", 2, "is float64; the graph takes float32"),
    ("--inputs extra arrays", "validate {d}/v.onnx --inputs {d}/extra.npz", 2, "the graph does not take: labels"),
    ("--inputs two iterations", "validate {d}/v.onnx --inputs {d}/two_iterations.json", 2, "holds 2 iterations"),
    ("--inputs missing", "validate {d}/v.onnx --inputs {d}/none.npz", 2, "cannot read inputs"),
    ("model name typo", "export --model vmoe-tny -o {d}/x.onnx", 2, "did you mean 'vmoe-tiny'"),
    (
        "an RTX build for Jetson Orin",
        "build engine --model vmoe-tiny --backend tensorrt-rtx --target sm_87 -o {d}/b",
        2,
        "TensorRT for RTX cannot build for sm_87 (Jetson Orin: build with --backend tensorrt",
    ),
    (
        "an RTX build for Hopper",
        "build engine {d}/v.onnx --backend tensorrt-rtx --target sm_90 -o {d}/e",
        2,
        "cannot build for sm_90 (Hopper (H100/H200): build with --backend tensorrt",
    ),
    (
        "an RTX build for Thor",
        "build engine {d}/v.onnx --backend tensorrt-rtx --target sm_110 -o {d}/e",
        2,
        "cannot build for sm_110 (Jetson Thor",
    ),
    ("an RTX build without a target", "build engine {d}/v.onnx --backend tensorrt-rtx -o {d}/e", 2, "give --target"),
    (
        "an unknown backend",
        "build engine {d}/v.onnx --backend tensorrt-llm -o {d}/e",
        2,
        "'tensorrt-llm' is not one of",
    ),
    ("unknown command", "exprot", 2, "No such command 'exprot'"),
]


@pytest.mark.parametrize(("case", "args", "code", "fragment"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(scene, case, args, code, fragment):
    before = snapshot(scene)
    result = run(*args.format(d=scene, m=USER_MODULES).split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert snapshot(scene) == before, "something was written or replaced"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a character device (a copy of /dev/null) needs root")
def test_a_device_node_is_never_replaced(tmp_path):
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    result = run("export", "--model", "vmoe-tiny", "-o", device)
    assert result.exit_code == 2 and "is a special file" in result.output
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_a_link_is_followed_and_kept(tmp_path, graph):
    """-o LINK writes the link's target (as cp and > do) and leaves the link a link."""
    target = tmp_path / "real" / "model.onnx"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    result = run("rewrite", graph, "-o", link)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.stat().st_size > 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]  # no temporaries left


def test_an_internal_error_exits_3_with_one_line_and_the_traceback_on_request(monkeypatch):
    import exporter.sources.zoo as zoo

    monkeypatch.setattr(zoo, "zoo_rows", lambda: 1 / 0)
    result = run("models")
    assert result.exit_code == 3
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("internal error (a bug in moe-export") and "ZeroDivisionError" in line and "--debug" in line
    for debug in (run("--debug", "models"), run("models", env={"MOE_EXPORT_DEBUG": "1"})):
        assert debug.exit_code == 3 and "Traceback" in debug.output and "ZeroDivisionError" in debug.output


def test_out_of_memory_is_an_environment_error(monkeypatch):
    import exporter.sources.zoo as zoo

    def rows():
        raise MemoryError("Unable to allocate 916. GiB for an array")

    monkeypatch.setattr(zoo, "zoo_rows", rows)
    result = run("models")
    assert result.exit_code == 2 and result.output.startswith("error: out of memory: MemoryError: Unable to allocate")


# --- faults: a full disk, a read-only folder --------------------------------------------------------


def test_a_full_disk_during_export(tmp_path, monkeypatch):
    from torch.onnx import ONNXProgram

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ONNXProgram, "save", full)
    result = run("export", "--model", "vmoe-tiny", "-o", tmp_path / "x.onnx", "--json", tmp_path / "x.json")
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert line.startswith("error: no space left on device (")
    assert list(tmp_path.iterdir()) == []  # neither half a graph nor a temporary


def test_a_full_disk_during_inspect_routing(tmp_path, monkeypatch):
    import matplotlib.figure

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    result = run("inspect", "routing", "--model", "vmoe-tiny", "-o", tmp_path / "r.png")
    assert result.exit_code == 2 and "error: no space left on device" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_the_export(tmp_path, monkeypatch):
    import exporter.fileio

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(exporter.fileio.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    result = run("export", "--model", "vmoe-tiny", "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "the export of vmoe-tiny needs about" in result.output, result.output
    assert "Tracing" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_destination_is_refused_before_any_work(tmp_path, monkeypatch):
    """Root writes into a mode-555 folder, so the refusal of a read-only mount is injected where the
    check writes (its probe file); without root the folder's mode is real enough."""
    import tempfile

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    for args in (
        ("export", "--model", "vmoe-tiny", "-o", read_only / "x.onnx"),
        ("validate", ROOT / "missing.onnx", "--json", read_only / "r.json"),
        ("build", "bundle", "--model", "vmoe-tiny", "-o", read_only / "b"),
    ):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert f"cannot write the {'folder' if args[0] == 'build' else 'file'}" in result.output
        assert "read-only file system" in result.output and "Building" not in result.output
    assert list(read_only.iterdir()) == []


def test_a_full_disk_while_compiling_ptx_is_not_called_a_triton_failure(tmp_path, monkeypatch):
    from exporter.deploy import ptx

    def compile_fails(*args, **kwargs):
        stderr = "Traceback ...\nOSError: [Errno 28] No space left on device: '/b/ptx/topk_route.ptx'\n"
        return subprocess.CompletedProcess(args, 1, "", stderr)

    monkeypatch.setattr(ptx.subprocess, "run", compile_fails)
    result = run("build", "bundle", "--model", "vmoe-tiny", "-o", tmp_path / "b")
    assert result.exit_code == 2, result.output
    assert "no space left on device" in result.output and "Triton could not compile" not in result.output
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


# --- killed runs ---------------------------------------------------------------------------------


def test_a_killed_bundle_build_leaves_a_temporary_the_next_run_removes(tmp_path):
    dest = tmp_path / "b"
    cmd = [sys.executable, "-m", "cli", "build", "bundle", "--model", "vmoe-tiny", "-o", str(dest)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".b.*.tmp/*")) and time.monotonic() < deadline:  # the build has started writing
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = list(tmp_path.glob(".b.*.tmp"))
    assert stale and not dest.exists()
    # the next run into the same destination removes it first
    result = run("build", "bundle", "--model", "vmoe-tiny", "-o", dest, "--target", "sm_87")
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale) and dest.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_temporaries_of_a_live_run_are_left_alone(tmp_path):
    from exporter.fileio import remove_stale_temporaries

    live = tmp_path / f".x.onnx.{os.getppid()}.abc.tmp"  # our parent: alive
    dead = tmp_path / ".x.onnx.999999999.abc.tmp"
    other = tmp_path / ".y.onnx.999999999.abc.tmp"
    for path in (live, dead, other):
        path.write_text("")
    assert remove_stale_temporaries(tmp_path / "x.onnx") == [dead]
    assert live.exists() and other.exists() and not dead.exists()


# --- provenance ------------------------------------------------------------------------------------


def test_a_graph_validates_from_any_directory_and_refuses_a_changed_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from exporter.sources.loading import from_zoo, load

    work = tmp_path / "work"
    (work / "graphs").mkdir(parents=True)
    state = load(from_zoo("vmoe-tiny", seed=3)).module.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "w.safetensors"))
    monkeypatch.chdir(work)
    export = run("export", "--model", "vmoe-tiny", "--checkpoint", "w.safetensors", "--routing-outputs",
                 "-o", "graphs/v.onnx")  # fmt: skip
    assert export.exit_code == 0, export.output
    raw = (work / "graphs" / "v.onnx").read_bytes()
    assert str(tmp_path).encode() not in raw and b'"checkpoint": "../w.safetensors"' in raw
    monkeypatch.chdir(tmp_path)
    assert run("validate", "work/graphs/v.onnx").exit_code == 0
    state[next(iter(state))] += 1
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "w.safetensors"))
    changed = run("validate", "work/graphs/v.onnx")
    assert changed.exit_code == 2 and "has changed since the export (SHA-256" in changed.output, changed.output
    assert "FAILED" not in changed.output


def test_a_checkpoint_that_pickles_objects_gets_one_line_a_user_can_act_on(tmp_path, graph):
    import torch

    torch.save({"weights": Path("x")}, tmp_path / "obj.pt")
    result = run("validate", graph, "--checkpoint", tmp_path / "obj.pt")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()[-1:]
    assert "pickles more than tensors" in line and "torch.save(model.state_dict(), path)" in line


def test_exports_from_two_checkouts_are_byte_identical_and_hold_no_path(tmp_path):
    outputs = []
    for name in ("one", "two"):
        checkout = tmp_path / name
        checkout.mkdir()
        for part in ("exporter", "plugins", "cli.py"):
            copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
            copy(ROOT / part, checkout / part)
        code = f"import cli, exporter; assert exporter.__file__.startswith({str(checkout)!r}); cli.main()"
        out = checkout / "v.onnx"
        proc = subprocess.run(
            [sys.executable, "-c", code, "export", "--model", "vmoe-tiny", "--routing-outputs", "-o", str(out)],
            cwd=checkout,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    for text in (str(tmp_path), str(ROOT), "stack_trace", ".py"):
        assert text.encode() not in outputs[0], text


# --- smaller ones ----------------------------------------------------------------------------------


def test_rewrite_of_a_graph_without_moe_layers_exits_2(tmp_path):
    dense = tmp_path / "dense.onnx"
    export = run("export", "--module", f"{USER_MODULES}:plain_cnn", "--input-shape", "2,3,16,16", "-o", dense)
    assert export.exit_code == 0, export.output
    for args in (("-o", tmp_path / "p.onnx"), ("--plan-only",)):
        result = run("rewrite", dense, *args)
        assert result.exit_code == 2 and "has no MoE layer to rewrite" in result.output, result.output
    assert not (tmp_path / "p.onnx").exists()


def test_the_n_of_input_shape_is_the_batch(graph):
    result = run("validate", graph, "--model", "vmoe-tiny", "--input-shape", "16,3,32,32", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["batch"] == 16


def test_inspect_routing_takes_one_capacity_factor_as_its_one_column(tmp_path):
    result = run("inspect", "routing", "--model", "vmoe-tiny", "--capacity-factor", "0.5", "-o", tmp_path / "r.png",
                 "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    columns = {row["column"] for row in json.loads(result.stdout)["stats"]}
    assert len(columns) == 2 and all("0.5" in c for c in columns), columns


def test_sweep_capacity_lists_only_the_options_it_takes():
    result = run("sweep", "capacity", "--help")
    assert result.exit_code == 0
    assert "--capacity-factor" not in result.output and "--batch-priority" not in result.output
    assert "--factors" in result.output and "--k " in result.output


def test_validate_takes_a_bundles_polygraphy_inputs(bundled):
    _, _, folder = bundled("vmoe-tiny")
    result = run("validate", folder / "model.onnx", "--inputs", folder / "inputs.json")
    assert result.exit_code == 0, result.output


def test_an_rtx_build_without_tensorrt_rtx_says_how_to_install_it(scene, monkeypatch):
    from exporter.backends import tensorrt_rtx

    monkeypatch.setattr(tensorrt_rtx, "_installed", lambda: False)
    before = snapshot(scene)
    result = run(
        "build", "engine", scene / "v.onnx", "--backend", "tensorrt-rtx", "--target", "sm_89", "-o", scene / "e"
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TensorRT for RTX is not installed; pip install tensorrt-rtx-cu12" in errors[0]
    assert snapshot(scene) == before


@pytest.mark.skipif(rtx_available() is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")
def test_a_graph_too_big_for_the_rtx_build_gets_one_line(scene, monkeypatch):
    from exporter.backends import tensorrt_rtx

    monkeypatch.setattr(tensorrt_rtx, "available_memory", lambda: 256 << 20)
    result = run(
        "build", "engine", scene / "v.onnx", "--backend", "tensorrt-rtx", "--target", "sm_89", "-o", scene / "e"
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "too big to build here: the build needs about" in errors[0]
    assert not (scene / "e").exists() or not list((scene / "e").iterdir())
