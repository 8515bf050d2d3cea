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

from exporter.backends.tensorrt_rtx import rtx_available
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[1]
USER_MODULES = ROOT / "tests" / "fixtures" / "user_modules.py"
FOREIGN = ROOT / "tests" / "fixtures" / "foreign_moe.py"


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


@pytest.fixture(scope="module")
def fp8_graph(graph, tmp_path_factory):
    """The same graph in FP8 (Q/DQ), made by the quantization pass on the FP32 graph."""
    import onnx_ir as ir

    from exporter.export.quantize import quantize
    from exporter.formats.graph import PRECISION_KEY

    model = ir.load(str(graph))
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantize(model, "fp8", moe_layers=["blocks.1.mlp", "blocks.3.mlp"], images=images, batch=8)
    model.metadata_props[PRECISION_KEY] = json.dumps({"precision": "fp8", "routing": "fp32"})
    path = tmp_path_factory.mktemp("fp8") / "v8.onnx"
    ir.save(model, str(path))
    return path


@pytest.fixture
def scene(tmp_path, graph, fp8_graph):
    """A folder with a graph, input files of every wrong kind, a special file and a fake huge image."""
    shutil.copy(graph, tmp_path / "v.onnx")
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "wrong_name.npz", pixels=images)
    np.savez(tmp_path / "int64.npz", images=images.astype(np.int64))
    np.savez(tmp_path / "float64.npz", images=images.astype(np.float64))
    np.savez(tmp_path / "extra.npz", images=images, labels=np.zeros(8))
    np.savez(tmp_path / "small.npz", images=images[:, :, :16, :16])
    np.savez(tmp_path / "few.npz", images=images[:4])
    np.savez(tmp_path / "nan.npz", images=np.where(images > 2.5, np.nan, images).astype(np.float32))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    shutil.copy(fp8_graph, tmp_path / "v8.onnx")
    (tmp_path / "two_iterations.json").write_text(json.dumps([{}, {}]))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "huge.png").write_bytes(png_header(20000, 20000))  # Pillow itself refuses to open it
    (tmp_path / "large.png").write_bytes(png_header(5000, 5000))  # Pillow opens it; moe-export's limit refuses
    (tmp_path / "dir").mkdir()
    return tmp_path


# (case, arguments with {d} for the scene folder, exit code, fragment of the one line)
CATALOGUE = [
    (
        "another author's layer sampling in eval",
        "export --module {f}:random_second_expert --input-shape 2,3,32,32 -o {d}/x.onnx",
        2,
        "draws uniform_ in eval (mixture_of_experts.py:",
    ),
    (
        "another author's layer sampling in eval: what to set",
        "export --module {f}:random_second_expert --input-shape 2,3,32,32 -o {d}/x.onnx",
        2,
        "the output depends on it: set second_policy_eval='all'",
    ),
    (
        "a size computed from tensor values, named with its line",
        "export --module {f}:data_dependent --input-shape 2,3,32,32 -o {d}/x.onnx",
        2,
        "a size computed from tensor values (a data-dependent shape) at foreign_moe.py:35 in forward",
    ),
    (
        "DeepSpeed sizing its buffers by the busiest expert",
        "export --module {f}:deepspeed_without_drops --input-shape 2,3,32,32 -o {d}/x.onnx",
        2,
        "drop_tokens=False sizes its buffers by the busiest expert",
    ),
    (
        "--routing-precision reduced of an fp32 graph",
        "export --model vmoe-tiny --routing-precision reduced -o {d}/x.onnx",
        2,
        "--routing-precision reduced needs --precision fp16 or bf16",
    ),
    ("--precision int4", "export --model vmoe-tiny --precision int4 -o {d}/x.onnx", 2, "'int4' is not one of"),
    (
        "calibration of another shape",
        "export --model vmoe-tiny --precision int8 --calibration {d}/small.npz -o {d}/x.onnx",
        2,
        "'images' is 8x3x16x16; the graph takes Nx3x32x32",
    ),
    (
        "calibration of another dtype",
        "export --model vmoe-tiny --precision int8 --calibration {d}/int64.npz -o {d}/x.onnx",
        2,
        "'images' is int64; the graph takes float32",
    ),
    (
        "calibration of another name",
        "export --model vmoe-tiny --precision int8 --calibration {d}/wrong_name.npz -o {d}/x.onnx",
        2,
        "holds ['pixels']; a calibration .npz holds one array named 'images'",
    ),
    (
        "calibration with NaN",
        "export --model vmoe-tiny --precision fp8 --calibration {d}/nan.npz -o {d}/x.onnx",
        2,
        "NaN or infinite values",
    ),
    (
        "calibration folder without images",
        "export --model vmoe-tiny --precision int8 --calibration {d}/dir -o {d}/x.onnx",
        2,
        "holds no PNG or JPEG images",
    ),
    (
        "calibration image unreadable",
        "export --model vmoe-tiny --precision int8 --calibration {d}/broken -o {d}/x.onnx",
        2,
        "0.png is not a readable PNG or JPEG image",
    ),
    (
        "calibration neither an .npz nor a folder",
        "export --model vmoe-tiny --precision int8 --calibration {d}/huge.png -o {d}/x.onnx",
        2,
        "is neither an .npz nor a folder of images",
    ),
    (
        "calibration of fewer images than a routing group",
        "export --model vmoe-tiny --precision int8 --calibration {d}/few.npz -o {d}/x.onnx",
        2,
        "holds 4 images; calibration needs at least one routing group (8)",
    ),
    (
        "calibration of a weight-only graph",
        "export --model vmoe-tiny --precision w4 --calibration {d}/extra.npz -o {d}/x.onnx",
        2,
        "--calibration applies to --precision int8 and fp8 only (w4 quantizes weights only)",
    ),
    (
        "FP8 for Jetson Orin",
        "build bundle --model vmoe-tiny --precision fp8 --target sm_87 -o {d}/b",
        2,
        "cannot target sm_87: FP8 needs sm_89 or newer (Jetson Orin has no FP8",
    ),
    (
        "an FP8 RTX engine for an RTX 30 GPU",
        "build engine {d}/v8.onnx --backend tensorrt-rtx --target sm_86 -o {d}/e",
        2,
        "in fp8 cannot target sm_86: FP8 needs sm_89 or newer",
    ),
    (
        "a bundle of an INT8 graph",
        "build bundle --model vmoe-tiny --precision int8 --target sm_87 -o {d}/b",
        2,
        "build bundle does not make int8 bundles yet (no --calibration here",
    ),
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
    result = run(*args.format(d=scene, m=USER_MODULES, f=FOREIGN).split())
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


# --- trust boundaries: what a user is handed (issue 22) -----------------------------------------------
#
# Each case builds its own bad input in the scene folder (a graph, a bundle, a checkpoint, an earlier
# import, a key) beside an ``outside`` folder holding a secret. Every case must exit with its code and
# one error line, leave the scene and the outside folder as they were, run no code it was handed (the
# planted module would write outside/PWNED) and copy no outside content into the scene.

import msgpack  # noqa: E402
import onnx  # noqa: E402

SECRET = "secret of the machine: not for any bundle"
VMOE_CKPT = ROOT / "tests" / "fixtures" / "vmoe" / "vmoe_small"
SPLIT_LEAF = ("Encoder", "encoderblock_0", "SelfAttention", "out", "kernel")  # rows 0:2 in shard 2, 2:4 in shard 0
EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("PWNED").write_text("the graph's code ran")
import torch
def build():
    return torch.nn.Linear(1, 1)
"""


class Trust:
    """The folders and fixtures a case's setup works with."""

    def __init__(self, scene: Path, outside: Path, graph: Path, bundle: Path, signed):
        self.d, self.outside, self.graph, self.bundle, self.signed = scene, outside, graph, bundle, signed

    def graph_with(self, name="g.onnx", **props) -> Path:
        """The vmoe-tiny graph with ``moe_export.<key>`` metadata entries replaced (None removes one)."""
        model = onnx.load(str(self.graph))
        meta = {p.key: p.value for p in model.metadata_props}
        for key, value in props.items():
            key = f"moe_export.{key}"
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value if isinstance(value, str) else json.dumps(value)
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, meta)
        onnx.save(model, str(self.d / name))
        return self.d / name

    def recorded(self, **changes) -> dict:
        model = onnx.load(str(self.graph), load_external_data=False)
        return {**json.loads({p.key: p.value for p in model.metadata_props}["moe_export.source"]), **changes}

    def copy_bundle(self, src=None, name="b") -> Path:
        shutil.copytree(src or self.bundle, self.d / name)
        return self.d / name

    def edit_manifest(self, bundle: Path, change) -> None:
        manifest = json.loads((bundle / "manifest.json").read_text())
        change(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))

    def checkpoint(self) -> Path:
        (self.d / "ck").mkdir(exist_ok=True)
        for f in VMOE_CKPT.parent.glob(f"{VMOE_CKPT.name}.*"):
            shutil.copy(f, self.d / "ck" / f.name)
        return self.d / "ck" / VMOE_CKPT.name

    def edit_index(self, change) -> None:
        index = Path(f"{self.checkpoint()}.index")
        content = msgpack.unpackb(index.read_bytes(), raw=False, strict_map_key=False)  # extension objects kept
        change(content)
        index.write_bytes(msgpack.packb(content, use_bin_type=True))


def index_entry(shape, regions, shards, dtype="float32") -> msgpack.ExtType:
    """A vmoe IndexInfo (extension 8) for ``shape`` split into ``regions`` ((start, stop) per dim)."""
    pack = msgpack.packb
    slices = [pack([pack([a, b, None]) for a, b in region]) for region in regions]
    return msgpack.ExtType(8, pack([pack([list(shape), dtype, False, {}]), slices, list(shards)]))


def set_leaf(content, path, value) -> None:
    node = content["index"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def split_leaf(regions_rows, shards=(2, 0)):
    return lambda c: set_leaf(
        c, SPLIT_LEAF, index_entry((4, 8, 32), [((a, b), (0, 8), (0, 32)) for a, b in regions_rows], shards)
    )


def nested(depth: int):
    tree = index_entry((1,), [((0, 1),)], [0])
    for i in range(depth):
        tree = {f"l{i}": tree}
    return tree


def chunk_written_twice(t: Trust) -> None:
    """Shard 0 holds the split array's rows 0:2 (shard 2's chunk) where its own rows 2:4 belong."""
    prefix = t.checkpoint()
    shards = [Path(f"{prefix}.data-0000{i}-of-00003") for i in range(3)]
    contents = [msgpack.unpackb(s.read_bytes(), raw=False, strict_map_key=False) for s in shards]
    index = msgpack.unpackb(Path(f"{prefix}.index").read_bytes(), raw=False, strict_map_key=False)
    names = []

    def walk(node, path=()):
        for key in sorted(node):
            (walk(node[key], (*path, key)) if isinstance(node[key], dict) else names.append((*path, key)))

    walk(index["index"])
    leaf = str(names.index(SPLIT_LEAF))
    (chunk_0_2,) = contents[2][leaf]
    contents[0][leaf][0][1] = chunk_0_2[1]  # shard 0's chunk now claims rows 0:2
    shards[0].write_bytes(msgpack.packb(contents[0], use_bin_type=True))


def npz_declaring(path: Path, nbytes: int) -> None:
    """A tiny .npz whose zip directory says its one member inflates to ``nbytes`` (a ZIP64 extra field)."""
    import io
    import zipfile

    member = io.BytesIO()
    np.save(member, np.zeros((8, 3, 32, 32), np.float32))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", member.getvalue())
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    name_len, extra_len = struct.unpack_from("<HH", data, central + 28)
    data[central + 46 + name_len + extra_len : central + 46 + name_len + extra_len] = struct.pack("<HHQ", 1, 8, nbytes)
    struct.pack_into("<H", data, central + 30, extra_len + 12)
    struct.pack_into("<I", data, central + 24, 0xFFFFFFFF)  # the uncompressed size: in the ZIP64 field
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<I", data, end + 12, struct.unpack_from("<I", data, end + 12)[0] + 12)
    path.write_bytes(bytes(data))


def npy_header_lies(path: Path) -> None:
    """An .npz whose .npy header says [10**9] float32 over 16 bytes of data."""
    import io
    import zipfile

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (10**9,)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images.npy", buffer.getvalue() + b"\0" * 16)


def foreign_project(t: Trust) -> None:
    (t.d / "src").mkdir()
    (t.d / "src" / "main.py").write_text("print('mine')\n")
    (t.d / "config.json").write_text('{"name": "my project"}')


def earlier_import(t: Trust, files=None) -> None:
    out = t.d / "m"
    out.mkdir()
    meta = {"format": "moe-export model", "model": {}}
    if files is not None:
        meta["files"] = files
    (out / "config.json").write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "notes.txt").write_text("the user's notes")


def evil_graph(t: Trust, spec: str) -> None:
    (t.outside / "evil.py").write_text(EVIL_MODULE)
    t.graph_with(source=t.recorded(kind="module", spec=spec, config=None))


def linked_file(t: Trust) -> None:
    """A listed file replaced by a link to the secret, its hash and size recomputed in the manifest."""
    b = t.copy_bundle()
    (b / "README.md").unlink()
    (b / "README.md").symlink_to(t.outside / "secret.txt")
    digest = __import__("hashlib").sha256(SECRET.encode()).hexdigest()
    t.edit_manifest(b, lambda m: m["files"].update({"README.md": {"sha256": digest, "bytes": len(SECRET)}}))


def signed_copy(t: Trust, change=None) -> Path:
    b = t.copy_bundle(t.signed[0], "sb")
    if change:
        change(b)
    return b


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def precision_of(t: Trust, value) -> None:
    t.graph_with(precision=value)


# (case, setup, arguments with {d} the scene and {o} the outside folder, exit code, fragment of the one line)
TRUST_CATALOGUE = [
    # imports replace only what moe-export wrote
    ("import -o the working folder", foreign_project, "import vmoe {ck} -o .", 2, "is the working folder"),
    ("import -o a folder holding the working folder", lambda t: (t.d / "w").mkdir(), "import vmoe {ck} -o ..", 2,
     "working folder or holds it"),
    ("import -o the working folder by its path", foreign_project, "import vmoe {ck} -o {d}", 2,
     "is the working folder"),
    ("import over another folder's config.json", lambda t: (foreign_project(t), shutil.move(t.d / "src", t.d / "w")),
     "import vmoe {ck} -o {d}/w", 2, "is not a moe-export model folder"),
    ("import over an import holding user files", lambda t: earlier_import(t, {"model.safetensors": None}),
     "import vmoe {ck} -o {d}/m", 2, "also holds files moe-export did not write (notes.txt)"),
    ("import over an old import holding user files", earlier_import, "import vmoe {ck} -o {d}/m", 2,
     "also holds files moe-export did not write (notes.txt)"),
    ("import over a marker listing ../", lambda t: earlier_import(t, {"../model.safetensors": None}),
     "import vmoe {ck} -o {d}/m", 2, "is not a moe-export model folder"),
    # checkpoints: tiling, sizes and bounds before any allocation
    ("a shard writes one chunk twice and another never", chunk_written_twice, "import vmoe {ck} -o {d}/m", 2,
     "Encoder/encoderblock_0/SelfAttention/out/kernel: chunk [0:2, 0:8, 0:32] is not one the index places here"),
    ("index chunks overlap", lambda t: t.edit_index(split_leaf([(0, 3), (2, 4)])), "import vmoe {ck} -o {d}/m", 2,
     "SelfAttention/out/kernel: its chunks overlap"),
    ("index lists a chunk twice", lambda t: t.edit_index(split_leaf([(0, 2), (0, 2)])), "import vmoe {ck} -o {d}/m",
     2, "SelfAttention/out/kernel lists one chunk twice"),
    ("index chunks leave a gap", lambda t: t.edit_index(split_leaf([(0, 1), (2, 4)])), "import vmoe {ck} -o {d}/m",
     2, "SelfAttention/out/kernel: its chunks leave a gap (256 of 1,024 elements"),
    ("an array of 2**40 elements", lambda t: t.edit_index(lambda c: set_leaf(c, ("head", "bias"),
     index_entry((2**40,), [((0, 2**40),)], [0])),), "export --checkpoint {ck} -o {d}/x.onnx", 2,
     "fewer than the 4,398,046,"),
    ("a negative index shape", lambda t: t.edit_index(lambda c: set_leaf(c, ("head", "bias"),
     index_entry((-5,), [((0, 1),)], [0]))), "import vmoe {ck} -o {d}/m", 2, "head/bias has the shape [-5]"),
    ("an index nested 40 deep", lambda t: t.edit_index(lambda c: c["index"].update(deep=nested(40))),
     "import vmoe {ck} -o {d}/m", 2, "nests deeper than 32 levels"),
    ("an index of 10**9 shards", lambda t: t.edit_index(lambda c: c.update(shard_count=10**9)),
     "import vmoe {ck} -o {d}/m", 2, "shard count 1000000000"),
    ("a chunk outside its array", lambda t: t.edit_index(split_leaf([(0, 2), (2, 5)])), "import vmoe {ck} -o {d}/m",
     2, "lies outside the dimension of 4"),
    # graph metadata never runs code, and is checked as data
    ("validate a graph recording a module file", lambda t: evil_graph(t, "../outside/evil.py:build"),
     "validate {d}/g.onnx", 2, "outside/evil.py:build, which moe-export does not import on a graph's word"),
    ("inspect a graph recording a module file", lambda t: evil_graph(t, "../outside/evil.py:build"),
     "inspect routing --onnx {d}/g.onnx -o {d}/r.png", 2, "pass --trust-module if you trust the graph"),
    ("validate a graph recording a module by name", lambda t: evil_graph(t, "evil:build"), "validate {d}/g.onnx", 2,
     "records the user module evil:build"),
    ("graph source not JSON", lambda t: t.graph_with(source="{kind: zoo"), "validate {d}/g.onnx", 2,
     "moe_export.source is not JSON"),
    ("graph source seed ill-typed", lambda t: t.graph_with(source=t.recorded(seed="0")),
     "validate {d}/g.onnx", 2, "missing, unknown or out-of-range 'seed'"),
    ("graph source a list", lambda t: t.graph_with(source=[1, 2]), "validate {d}/g.onnx", 2,
     "is not a JSON object"),
    ("graph config with an unknown field", lambda t: t.graph_with(source=t.recorded(
     config={**t.recorded()["config"], "code": "import os"})), "validate {d}/g.onnx", 2,
     "model config field 'code' is unknown"),
    ("graph config of a billion-wide model", lambda t: t.graph_with(source=t.recorded(
     config={**t.recorded()["config"], "dim": 2**20, "mlp_dim": 2**20, "heads": 1})), "validate {d}/g.onnx", 2,
     "parameters; the limit is 16,000,000,000"),
    ("graph routing layers not a list", lambda t: t.graph_with(routing_layers={"a": 1}),
     "validate {d}/g.onnx", 2, "moe_export.routing_layers is not a list of layer names"),
    ("graph V-MoE settings ill-typed", lambda t: t.graph_with(vmoe_layers={"blocks.1.mlp": {"k": "2"}}),
     "rewrite {d}/g.onnx -o {d}/p.onnx", 2, "moe_export.vmoe_layers is out of range or missing for blocks.1.mlp"),
    ("graph precision unknown", lambda t: precision_of(t, {"precision": "fp64"}), "validate {d}/g.onnx", 2,
     "moe_export.precision is not a precision"),
    ("graph precision not JSON", lambda t: precision_of(t, "fp16"), "validate {d}/g.onnx", 2,
     "moe_export.precision is not JSON"),
    ("graph claims fp16 over fp32 weights", lambda t: precision_of(t, {"precision": "fp16", "routing": "fp32"}),
     "validate {d}/g.onnx", 2, "says it is fp16 but its weights are float32 only"),
    # bundles: the manifest, paths, links, keys
    ("bundle manifest without files", lambda t: t.edit_manifest(t.copy_bundle(), lambda m: m.pop("files")),
     "validate {d}/b", 2, "'files' (a map of file names to their sha256 and bytes) is missing or ill-typed"),
    ("bundle manifest files a list", lambda t: t.edit_manifest(t.copy_bundle(),
     lambda m: m.update(files=list(m["files"]))), "build engine {d}/b -o {d}/copy", 2, "'files' (a map"),
    ("bundle manifest without sample", lambda t: t.edit_manifest(t.copy_bundle(), lambda m: m.pop("sample")),
     "validate {d}/b", 2, "'sample' (its batch and seed) is missing or ill-typed"),
    ("bundle manifest lists ../", lambda t: t.edit_manifest(t.copy_bundle(), lambda m: m["files"].update(
     {"../outside/secret.txt": {"sha256": "0" * 64, "bytes": 1}})), "build engine {d}/b -o {d}/copy", 2,
     "it lists '../outside/secret.txt', which is not a relative path inside the bundle"),
    ("bundle manifest lists an absolute path", lambda t: t.edit_manifest(t.copy_bundle(), lambda m: m["files"].update(
     {"/etc/hostname": {"sha256": "0" * 64, "bytes": 1}})), "validate {d}/b", 2, "'/etc/hostname', which is not"),
    ("bundle engine entry of an unlisted file", lambda t: t.edit_manifest(t.copy_bundle(), lambda m: m.update(
     engine={"file": "x.engine", "graph": "model.onnx", "precision": "fp32"})), "validate {d}/b", 2,
     "'engine' (none, or the engine's file, graph and precision) is missing or ill-typed"),
    ("bundle file replaced by a link, copied", linked_file, "build engine {d}/b -o {d}/copy", 2,
     "README.md is a link in the bundle, not a file"),
    ("bundle file replaced by a link, validated", linked_file, "validate {d}/b", 2, "README.md is a link"),
    ("bundle manifest a link", lambda t: (t.copy_bundle(), (t.d / "b" / "manifest.json").rename(t.d / "m.json"),
     (t.d / "b" / "manifest.json").symlink_to(t.d / "m.json")), "validate {d}/b", 2, "is not a regular file"),
    ("unsigned bundle with --verify-key", lambda t: t.copy_bundle(), "validate {d}/b --verify-key {pub}", 2,
     "is not signed: --verify-key takes only a bundle built with --sign-key"),
    ("signed bundle, another key", signed_copy, "validate {d}/sb --verify-key {other}", 2,
     "manifest.json is signed by another key"),
    ("signed bundle, manifest edited", lambda t: signed_copy(t, lambda b: t.edit_manifest(b,
     lambda m: m["sample"].update(seed=1))), "build engine {d}/sb --verify-key {pub} -o {d}/copy", 2,
     "manifest.json has changed since it was signed"),
    ("signed bundle, a file edited", lambda t: signed_copy(t, lambda b: flip_byte(b / "model.onnx")),
     "validate {d}/sb --verify-key {pub}", 2, "model.onnx has changed since the bundle was built"),
    ("signed bundle, signature removed", lambda t: signed_copy(t, lambda b: (b / "manifest.sig").unlink()),
     "validate {d}/sb --verify-key {pub}", 2, "manifest.sig is missing or not a file"),
    ("signed bundle, signing entry removed", lambda t: signed_copy(t, lambda b: t.edit_manifest(b,
     lambda m: m.update(signature=None))), "validate {d}/sb --verify-key {pub}", 2, "is not signed"),
    ("--verify-key on a graph", lambda t: t.graph_with(), "validate {d}/g.onnx --verify-key {pub}", 2,
     "give the bundle folder"),
    ("--verify-key with a private key", signed_copy, "validate {d}/sb --verify-key {private}", 2,
     "give the public key (KEY.pub), not the private one"),
    ("--sign-key not a key", lambda t: (t.d / "k").write_text("not a key"),
     "build bundle --model vmoe-tiny --sign-key {d}/k -o {d}/nb", 2, "is not an unencrypted PEM private key"),
    ("build bundle over a web app's manifest.json", lambda t: (t.d / "w").mkdir() or (t.d / "w" / "manifest.json")
     .write_text("{}"), "build bundle --model vmoe-tiny -o {d}/w", 2, "exists and is not a moe-export bundle"),
    ("build bundle -o the working folder", lambda t: t.copy_bundle(), "build bundle --model vmoe-tiny -o .", 2,
     "is the working folder"),
    ("keygen over an existing key", lambda t: (t.d / "k").write_text("mine"), "keygen -o {d}/k", 2,
     "a key is never replaced"),
    # inputs
    ("--inputs with a NaN", lambda t: np.savez(t.d / "nan.npz", images=np.where(np.arange(8 * 3 * 32 * 32)
     .reshape(8, 3, 32, 32) == 5, np.nan, 0).astype(np.float32)), "validate {v} --inputs {d}/nan.npz", 2,
     "'images' holds 1 NaN or infinite values"),
    ("--inputs with an infinity", lambda t: np.savez(t.d / "inf.npz", images=np.full((8, 3, 32, 32), np.inf,
     np.float32)), "validate {v} --inputs {d}/inf.npz", 2, "holds 24,576 NaN or infinite values"),
    ("--inputs .npz declaring 4.9 GB", lambda t: npz_declaring(t.d / "big.npz", 4_900_000_000),
     "validate {v} --inputs {d}/big.npz", 2, "declares 4,900,000,000 bytes; the limit is"),
    ("--inputs .npy header larger than its data", lambda t: npy_header_lies(t.d / "lie.npz"),
     "validate {v} --inputs {d}/lie.npz", 2, "says it is float32[1000000000], 4,000,000,000 bytes, which does not fit"),
    ("--inputs holding objects", lambda t: np.savez(t.d / "obj.npz", images=np.array([{"a": 1}], dtype=object)),
     "validate {v} --inputs {d}/obj.npz", 2, "holds Python objects (a pickle)"),
    # comparisons
    ("outputs of another shape", lambda t: None, f"validate {{v}} --module {USER_MODULES}:plain_cnn --input-shape "
     "8,3,32,32", 2, "the graph's output logits is 8x10 but the model's output is 8x4: they cannot be compared"),
]  # fmt: skip


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A bundle signed with `build bundle --sign-key`, its public key and another key pair's."""
    folder = tmp_path_factory.mktemp("signed")
    for name in ("signing.key", "other.key"):
        assert run("keygen", "-o", folder / name).exit_code == 0
    result = run("build", "bundle", "--model", "vmoe-tiny", "--target", "sm_87", "--sign-key", folder / "signing.key",
                 "-o", folder / "bundle")  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder / "bundle", folder / "signing.key.pub", folder / "other.key.pub", folder / "signing.key"


def files_of(folder: Path) -> dict[str, bytes]:
    """Every regular file's bytes (links not followed)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if
            p.is_file() and not p.is_symlink()}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "setup", "args", "code", "fragment"), TRUST_CATALOGUE, ids=[c[0] for c in TRUST_CATALOGUE]
)
def test_trust_catalogue(tmp_path, monkeypatch, graph, bundled, signed, case, setup, args, code, fragment):
    scene, outside = tmp_path / "scene", tmp_path / "outside"
    for folder in (scene, outside):
        folder.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    monkeypatch.syspath_prepend(str(outside))  # where a module named in a graph (evil:build) would be found
    trust = Trust(scene, outside, graph, bundled("vmoe-tiny")[2], signed)
    setup(trust)
    monkeypatch.chdir(scene / "w" if (scene / "w").is_dir() and ".." in args else scene)
    names = dict(d=scene, o=outside, v=graph, ck=scene / "ck" / VMOE_CKPT.name, pub=signed[1], other=signed[2],
                 private=signed[3])  # fmt: skip
    before, outside_before = snapshot(scene), snapshot(outside)
    result = run(*args.format(**names).split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert snapshot(scene) == before, "something was written or replaced"
    assert snapshot(outside) == outside_before and not (outside / "PWNED").exists(), "code it was handed ran"
    assert not any(SECRET.encode() in data for data in files_of(scene).values()), "outside content was copied"


def test_a_recorded_module_runs_only_when_named_or_trusted(tmp_path):
    """The refusal is not hollow: the same graph validates once the module is named or trusted."""
    graph = tmp_path / "cnn.onnx"
    module = f"{USER_MODULES}:plain_cnn"
    assert run("export", "--module", module, "--input-shape", "2,3,16,16", "-o", graph).exit_code == 0
    refused = run("validate", graph)
    assert refused.exit_code == 2 and "records the user module" in refused.output and "--trust-module" in refused.output
    assert run("validate", graph, "--trust-module").exit_code == 0
    assert run("validate", graph, "--module", module, "--input-shape", "2,3,16,16").exit_code == 0


def test_a_signed_bundle_verifies_with_its_key_and_the_targets_engine_is_not_signed(signed, tmp_path):
    """build bundle --sign-key, then on the target: the key verifies it (validate and build engine go on
    to the engine, which needs TensorRT here), a copy keeps the signature, and the engine build engine
    records later is named as the target's own, outside the signature."""
    from exporter.formats.bundle import file_entry, open_bundle, verify_bundle

    bundle, public, _, _ = signed
    assert verify_bundle(bundle, public)["signature"]["algorithm"] == "Ed25519"
    validated = run("validate", bundle, "--verify-key", public)
    assert validated.exit_code == 2 and "has no engine yet" in validated.output, validated.output
    copy = tmp_path / "copy"
    built = run("build", "engine", bundle, "--verify-key", public, "-o", copy)
    assert built.exit_code == 2 and "needs TensorRT" in built.output and "is complete" in built.output, built.output
    assert (copy / "manifest.sig").read_bytes() == (bundle / "manifest.sig").read_bytes()
    (copy / "model.engine").write_bytes(b"built on the target")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engine"] = {"file": "model.engine", "graph": "model.plugins.onnx", "precision": "fp32"}
    manifest["files"]["model.engine"] = file_entry(copy / "model.engine")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _, notes = open_bundle(copy, public)
    assert notes[0].startswith("signature verified: Ed25519") and "model.engine was added on this target" in notes[1]


def test_an_unlisted_link_is_reported_and_never_copied(bundled, tmp_path):
    from exporter.formats.bundle import copy_bundle, open_bundle

    (tmp_path / "secret.txt").write_text(SECRET)
    bundle = tmp_path / "b"
    shutil.copytree(bundled("vmoe-tiny")[2], bundle)
    (bundle / "leak").symlink_to(tmp_path / "secret.txt")
    (bundle / "notes.txt").write_text("mine")
    _, notes = open_bundle(bundle)
    assert notes == ["not in the manifest, so neither used nor copied: leak (a link), notes.txt"]
    copy = copy_bundle(bundle, tmp_path / "copy")
    assert not (copy / "leak").exists() and not (copy / "notes.txt").exists()
    assert not any(SECRET.encode() in data for data in files_of(copy).values())
    assert sorted(files_of(copy)) == sorted([*json.loads((bundle / "manifest.json").read_text())["files"],
                                             "manifest.json"])  # fmt: skip


@pytest.mark.parametrize("args", [["models"], ["models", "--json", "-"]])
@pytest.mark.parametrize("stdout", ["closed", "broken pipe"])
def test_a_report_that_cannot_be_written_is_an_error(args, stdout):
    """A closed stdout (the command started with fd 1 closed) or a pipe whose reader has gone: exit 2
    and one line, never exit 0 with nothing written."""
    cmd = [sys.executable, "-m", "cli", *args]
    if stdout == "closed":
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.close(1))  # fmt: skip
    else:
        read, write = os.pipe()
        os.close(read)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True)
        os.close(write)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: the report could not be written: "), line


def test_a_seed_other_than_the_recorded_one_says_which_is_used(graph):
    result = run("validate", graph, "--seed", 5, "--json", "-")
    assert result.exit_code == 1  # other random weights than the graph's: parity fails, and the note says why
    notes = json.loads(result.stdout)["notes"]
    assert any("--seed 5 is used, not the seed 0" in n and "random weights are not" in n for n in notes), notes


def test_routing_outputs_on_a_soft_moe_is_noted_as_ignored(tmp_path):
    result = run("export", "--model", "soft-moe-tiny", "--routing-outputs", "-o", tmp_path / "s.onnx")
    assert result.exit_code == 0
    notes = [line for line in result.output.splitlines() if "--routing-outputs" in line]
    expected = (
        "note: --routing-outputs is ignored: soft-moe-tiny has no layer of moe-export's V-MoE class "
        "(a Soft-MoE routes by weights; another author's top-k layer does not name its decisions)"
    )
    assert notes == [expected]


def test_bundles_from_two_checkouts_are_byte_identical_and_hold_no_path(bundled, tmp_path):
    """The session's bundle of vmoe-tiny, built from this checkout, against one built by another copy of
    the code in another folder, in its own process: every file byte for byte the same, the manifest
    too but for the keys it names as not reproducible (its time); no file holds a path of either
    checkout, of the virtual environment or of the home folder (the PTX have no line info)."""
    reference = bundled("vmoe-tiny")[2]
    checkout = tmp_path / "elsewhere"
    checkout.mkdir()
    for part in ("exporter", "plugins", "cli.py"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, checkout / part)
    code = f"import cli, exporter; assert exporter.__file__.startswith({str(checkout)!r}); cli.main()"
    env = {k: v for k, v in os.environ.items() if k not in ("SOURCE_DATE_EPOCH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code, "build", "bundle", "--model", "vmoe-tiny", "-o",
                           str(checkout / "b")], cwd=checkout, capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ours, theirs = files_of(reference), files_of(checkout / "b")
    assert sorted(ours) == sorted(theirs)
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert differ == ["manifest.json"], differ
    manifests = [json.loads(files[name]) for files in (ours, theirs) for name in ["manifest.json"]]
    assert manifests[0]["reproducible_except"] == ["created"]
    for manifest in manifests:
        for key in manifest["reproducible_except"]:
            manifest.pop(key)
    assert manifests[0] == manifests[1]
    for path in {str(ROOT), str(checkout), sys.prefix, str(Path.home()), str(tmp_path)}:
        assert not [name for name, data in {**ours, **theirs}.items() if path.encode() in data], path


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


# --- other authors' layers (issue 20) ------------------------------------------------------------------


def test_a_failed_export_says_one_line_and_nothing_else(tmp_path):
    """torch.export's FX dumps and logs go to the log file the line names, never to stderr."""
    pytest.importorskip("mixture_of_experts", reason="the test extra installs mixture-of-experts")
    cli = [sys.executable, "-c", "from cli import main; main()"]
    args = ["export", "--module", f"{FOREIGN}:data_dependent", "--input-shape", "2,3,32,32", "-o", "x.onnx"]
    done = subprocess.run([*cli, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("...", "✓"))]
    assert len(lines) == 1 and lines[0].startswith("error: export failed: a size computed from tensor values"), done
    log = Path(lines[0].rsplit("full log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()  # what torch said is kept, in the file
    assert not (tmp_path / "x.onnx").exists()


def test_a_layer_whose_order_torch_leaves_undefined_is_refused(tmp_path):
    """DeepSpeed top-1 with an expert overflowing keeps the tokens torch.topk returns first among equal
    values: the graph cannot compute that, so export checks and refuses it (exit 1), writing nothing."""
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed")
    result = run(
        "export", "--module", f"{FOREIGN}:deepspeed_top1_drops", "--input-shape", "2,3,32,32", "-o", tmp_path / "x.onnx"
    )
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("FAILED:")]
    assert "does not match the model at batch 2" in line and "torch.topk returns first" in line
    assert not list(tmp_path.iterdir())


def test_a_model_that_fixes_its_batch_is_exported_at_that_batch_and_says_where(tmp_path):
    result = run(
        "export", "--module", f"{FOREIGN}:fixed_batch", "--input-shape", "2,3,32,32", "-o", tmp_path / "x.onnx",
        "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dynamic_batch"] is False and report["inputs"]["images"][1][0] == 2
    (note,) = [n for n in report["notes"] if n.startswith("the batch is fixed at 2")]
    assert "foreign_moe.py:" in note and "full log:" in note
    assert list(report["checked"]) == ["2"]  # checked at the one batch it takes
