"""build_engine_for: what `moe-export build engine` runs, as a library call. Where TensorRT is
absent every path that would build stops with one reason, after checking what it can on CPU (the
builds themselves are GPU-marked in tests/exporter/backends/test_tensorrt.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from exporter.backends.tensorrt import EngineOptions, TensorRTUnavailable, tensorrt_available
from exporter.backends.tensorrt_rtx import rtx_available
from exporter.deploy.engines import build_engine_for
from exporter.errors import UserError
from exporter.sources.loading import from_zoo

NO_TENSORRT = tensorrt_available() is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(source=None), "give a bundle folder, an exported .onnx or a model"),
        (dict(source=from_zoo("soft-moe-tiny")), "give `output_dir`: the bundle folder to write"),
        (dict(source="x.onnx"), "give `output_dir`: the folder for the engine"),
        (dict(source="README.md"), "neither a moe-export bundle nor an .onnx file"),
    ],
)
def test_what_to_build_from_is_checked_first(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_engine_for(**kwargs)


def test_bundle_and_model_together_are_refused(bundled):
    _, _, folder = bundled("soft-moe-tiny")
    from tests.helpers import run

    both = run("build", "engine", folder, "--model", "soft-moe-tiny", "-o", folder)
    assert both.exit_code == 2 and "not both" in both.output  # the command resolves --model/--module
    with pytest.raises(UserError, match="`triton_repo` needs a bundle"):
        build_engine_for("x.onnx", triton_repo="repo")


def test_profile_options_are_checked_before_anything_else(bundled):
    _, _, folder = bundled("soft-moe-tiny")
    with pytest.raises(UserError):
        build_engine_for(folder, options=EngineOptions(min_batch=8, max_batch=4))


@pytest.mark.skipif(not NO_TENSORRT, reason="checks the refusal where TensorRT is absent")
def test_without_tensorrt_a_bundle_is_left_complete(bundled, tmp_path):
    _, _, folder = bundled("soft-moe-tiny")
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(TensorRTUnavailable, match="is complete: build its engine on the target"):
        build_engine_for(bundle)
    assert (bundle / "manifest.json").read_bytes() == before and not (bundle / "model.engine").exists()


@pytest.mark.skipif(not NO_TENSORRT, reason="checks the refusal where TensorRT is absent")
def test_without_tensorrt_build_engine_refuses_before_importing_torch(bundled):
    """The refusal is instant: TensorRT is looked for before torch (seconds to import) is loaded."""
    _, _, folder = bundled("soft-moe-tiny")
    code = (
        "import sys\nfrom cli import main\ntry:\n    main(['build', 'engine', sys.argv[1]])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert done.stderr.startswith(f"error: building the engine of {folder} needs TensorRT and a GPU")


def test_a_changed_bundle_file_is_refused_before_building(bundled, tmp_path):
    _, _, folder = bundled("soft-moe-tiny")
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    graph = bundle / "model.plugins.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.plugins.onnx has changed since the bundle was built"):
        build_engine_for(bundle)
    with pytest.raises(UserError, match="model.plugins.onnx has changed since the bundle was built"):
        build_engine_for(bundle, output_dir=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_every_file_of_a_bundle_is_checked_by_validate_and_build_engine(bundled, tmp_path):
    """One byte flipped in any file the manifest lists, or the file removed: both commands refuse the
    bundle and name the file, before anything else (even "no engine yet")."""
    from exporter.parity.validate import validate

    _, _, folder = bundled("soft-moe-tiny")
    names = sorted(json.loads((folder / "manifest.json").read_text())["files"])
    assert {"model.onnx", "model.plugins.onnx", "inputs.npz", "reference_outputs.npz", "README.md"} <= set(names)
    for i, name in enumerate(names):
        bundle = tmp_path / f"b{i}"
        shutil.copytree(folder, bundle)
        path = bundle / name
        if i % 4 == 3:
            path.unlink()
            expected = f"{name} is missing from the bundle"
        else:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
            expected = f"{name} has changed since the bundle was built"
        for run in (validate, build_engine_for):
            with pytest.raises(UserError) as raised:
                run(bundle)
            assert expected in str(raised.value), (name, str(raised.value))
        shutil.rmtree(bundle)


@pytest.mark.skipif(rtx_available() is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")
def test_the_bundle_readme_rtx_command_builds_engines_into_the_bundle_and_its_manifest(bundled, tmp_path):
    """`moe-export build engine . --backend tensorrt-rtx --target ...` in the bundle folder, as its README
    says: one engine per target, in the manifest with its hash (validate then checks it), not run here."""
    import shlex

    from exporter.backends.tensorrt_rtx import TARGETS, gpu_arch
    from exporter.formats.bundle import check_files, read_manifest
    from tests.helpers import run

    _, _, folder = bundled("soft-moe-tiny")
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    text = (bundle / "README.md").read_text()
    lines = [x for x in text.splitlines() if x.startswith("moe-export build engine . --backend tensorrt-rtx")]
    assert len(lines) == 2 and "--portable" in lines[1]
    line = lines[0]
    args = shlex.split(line.split("#")[0])[1:] + ["--json", str(tmp_path / "r.json")]
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        result = run(*args)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(bundle)
    assert set(manifest["rtx_engines"]) == {"sm_89", "sm_120"}
    for target, entry in manifest["rtx_engines"].items():
        assert entry["file"] == f"model.{target}.engine" and entry["graph"] == "model.plugins.onnx"
        assert entry["plugin_layers"] == manifest["plugins"]["nodes"]
    check_files(bundle, None, manifest)  # the engines' hashes are recorded
    report = json.loads((tmp_path / "r.json").read_text())
    assert [e["target"] for e in report["engines"]] == ["sm_89", "sm_120"] and report["passed"]
    if gpu_arch() not in TARGETS:
        assert result.output.strip().splitlines()[-1].startswith("built, not run: no GPU of its target here")
        assert all(e["run"].startswith("not run") for e in report["engines"])
