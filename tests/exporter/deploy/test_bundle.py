"""Deploy bundles, built on CPU: every file, the manifest and its hashes, the sample data in both formats,
the precompiled PTX, and the README's Polygraphy command run for real (with ONNX Runtime in place of
TensorRT, the one substitution a CPU machine needs)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter import settings
from exporter.deploy.bundle import build_bundle, bundle_source
from exporter.deploy.ptx import plugin_node_shapes
from exporter.errors import CheckFailed, UserError
from exporter.fileio import sha256
from exporter.formats.bundle import FORMAT, file_entry, read_manifest
from exporter.sources.loading import from_zoo, load

ROOT = Path(__file__).resolve().parents[3]
MODELS = {
    "vmoe": ("vmoe-tiny", dict(capacity_factor=0.5, batch_priority=True)),  # tokens are dropped
    "soft": ("soft-moe-tiny", {}),
}
TOP_LEVEL = {
    "README.md",
    "images.bin",
    "inputs.json",
    "inputs.npz",
    "manifest.json",
    "model.onnx",
    "model.plugins.onnx",
    "polygraphy_network.py",
    "reference_outputs.json",
    "reference_outputs.npz",
}


@pytest.fixture(scope="module")
def bundles(bundled):
    return {key: bundled(name, **overrides) for key, (name, overrides) in MODELS.items()}


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("key", list(MODELS))
def test_every_file_is_there_and_hashed(bundles, key):
    source, result, folder = bundles[key]
    files = files_in(folder)
    package = {f"plugins/{p.relative_to(ROOT / 'plugins').as_posix()}" for p in (ROOT / "plugins").rglob("*.py")}
    ptx = {f for f in files if f.startswith("ptx/")}
    assert files == TOP_LEVEL | package | ptx
    from plugins.aot import target_unsupported

    arches = {"sm_87", "sm_90"} | ({"sm_110"} if target_unsupported(110) is None else set())  # Thor: Triton >= 3.9
    assert "ptx/manifest.json" in ptx and {f.split("/")[1] for f in ptx if f.endswith(".ptx")} == arches
    manifest = read_manifest(folder)
    assert set(manifest["files"]) == files - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(folder / name) and entry["bytes"] == (folder / name).stat().st_size, name
    assert result.passed and result.files == manifest["files"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("key", list(MODELS))
def test_manifest_fields(bundles, key):
    source, result, folder = bundles[key]
    m = read_manifest(folder)
    assert m["format"] == FORMAT and m["engine"] is None
    assert bundle_source(folder) == source
    assert m["model"]["name"] == source.name and m["model"]["family"] == ("vmoe" if key == "vmoe" else "soft_moe")
    (inp,) = m["inputs"]
    assert inp["name"] == "images" and inp["dtype"] == "float32" and inp["shape"][1:] == [3, 32, 32]
    outputs = {o["name"]: o["dtype"] for o in m["outputs"]}
    assert outputs["logits"] == "float32"
    if key == "vmoe":
        assert m["model"]["batch_multiple"] == 8 and m["sample"]["batch"] == 8
        assert {outputs[f"routing.blocks.1.mlp.{f}"] for f in ("expert_index", "buffer_slot")} == {"int32"}
        assert outputs["routing.blocks.1.mlp.kept"] == "bool"
        assert m["plugins"]["nodes"] == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
        assert m["parity_cpu"]["model.plugins.onnx"]["routing_decisions"] == 1.0
    else:
        assert m["plugins"]["nodes"] == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}
    assert all(p["passed"] and p["max_rel_err"] <= 1e-4 for p in m["parity_cpu"].values())
    assert m["tolerances"]["fp32"] == {"rtol": settings.FP32_TOLERANCES.rtol, "routing_agreement": 1.0}
    from plugins.aot import target_unsupported

    thor = ["sm_110"] if target_unsupported(110) is None else []
    assert m["plugins"]["ptx_targets"] == ["sm_87", "sm_90", *thor] and m["plugins"]["ptx_kernels"] > 0
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert all(m["versions"][p] for p in ("onnx", "onnxruntime", "polygraphy", "python"))
    assert "10.9" in m["requirements"]["plugin_engine"] and "10.3" in m["requirements"]["portable_engine"]


@pytest.mark.parametrize("key", list(MODELS))
def test_sample_data_agree_across_formats_and_with_pytorch(bundles, key):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from exporter.models.capture import run_with_routing

    source, _, folder = bundles[key]
    images = np.load(folder / "inputs.npz")["images"]
    assert np.array_equal(load_json(str(folder / "inputs.json"))[0]["images"], images)
    assert np.array_equal(np.fromfile(folder / "images.bin", dtype=np.float32).reshape(images.shape), images)
    reference = dict(np.load(folder / "reference_outputs.npz"))
    ((runner, iterations),) = RunResults.load(str(folder / "reference_outputs.json"))
    assert runner == "pytorch" and set(iterations[0]) == set(reference)
    for name, value in reference.items():
        assert np.array_equal(iterations[0][name], value), name
    outputs, routing = run_with_routing(load(source).module, torch.from_numpy(images))
    np.testing.assert_allclose(reference["logits"], outputs[0].numpy(), rtol=1e-6, atol=1e-6)
    for layer, r in routing.items():
        assert np.array_equal(reference[f"routing.{layer}.expert_index"], r.expert.numpy())
        assert np.array_equal(reference[f"routing.{layer}.buffer_slot"], r.slot.numpy())
        assert np.array_equal(reference[f"routing.{layer}.kept"], r.slot.numpy() >= 0)
    if key == "vmoe":
        assert not reference["routing.blocks.1.mlp.kept"].all()  # the sample exercises dropped tokens


@pytest.mark.parametrize("key", list(MODELS))
def test_precompiled_ptx_covers_every_plugin_node(bundles, key):
    from plugins.aot import PER_ARCH, load_precompiled, node_recipes, target_unsupported

    _, _, folder = bundles[key]
    nodes = plugin_node_shapes(folder / "model.plugins.onnx", seed=0)
    assert len(nodes) == 6
    # the default targets: Orin, Hopper, and Thor (PTX ISA 9.0) where this Triton can compile it
    targets = {87: ("sm_87", "8.5"), 90: ("sm_90a", "8.5")}
    if target_unsupported(110) is None:
        targets[110] = ("sm_110a", "9.0")
    manifest = read_manifest(folder)
    assert manifest["plugins"]["ptx_targets"] == [f"sm_{a}" for a in targets]
    assert manifest["plugins"]["ptx_version"] == {f"sm_{a}": int(v.replace(".", "")) for a, (_, v) in targets.items()}
    assert {dtype for *_, dtype in nodes} == {"float32"}  # strongly typed: the graph's type only
    for op, attrs, shapes, dtype in nodes:
        for recipe in node_recipes(op, shapes, attrs, dtypes=[dtype]):
            for arch, (target, isa) in targets.items():
                found = load_precompiled(recipe, arch, PER_ARCH, folder / "ptx")  # the TensorRT build's lookup
                assert found is not None, (op, recipe.key(), arch)
                assert f".target {target}" in found.ptx and f".entry {found.name}" in found.ptx
                assert f".version {isa}\n" in found.ptx


def readme_command(folder: Path, starts: str) -> list[str]:
    text = (folder / "README.md").read_text().replace("\\\n", " ")
    (line,) = [line.strip() for line in text.splitlines() if line.strip().startswith(starts)]
    return shlex.split(line)


def polygraphy(args: list[str], folder: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("polygraphy")
    return subprocess.run([str(exe), *args[1:]], cwd=folder, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("key", list(MODELS))
def test_readme_polygraphy_command_passes_and_can_fail(bundles, key, tmp_path):
    """The README's command for the portable graph, with --onnxrt for --trt; the plugin graph runs in ONNX
    Runtime through its local functions, so the same tolerances are checked on it too."""
    _, _, folder = bundles[key]
    args = readme_command(folder, "polygraphy run model.onnx --trt")
    assert "--load-inputs" in args and "--load-outputs" in args and args[args.index("--rtol") + 1] == "0"
    # the profile must hold the sample batch: Polygraphy puts every dynamic dimension at 1 otherwise
    batch = read_manifest(folder)["sample"]["batch"]
    for flag in ("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes"):
        assert args[args.index(flag) + 1] == f"images:[{batch},3,32,32]", flag
    assert "--trt-min-shapes" in readme_command(folder, "PYTHONPATH=. MOE_PLUGINS_PTX_DIR=ptx polygraphy run")
    onnxrt = [a if a != "--trt" else "--onnxrt" for a in args]
    for graph in ("model.onnx", "model.plugins.onnx"):
        proc = polygraphy([a if a != "model.onnx" else graph for a in onnxrt], folder)
        assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    atol = read_manifest(folder)["polygraphy_atol"]["logits"]
    shifted = dict(np.load(folder / "reference_outputs.npz"))
    shifted["logits"] = shifted["logits"] + 2 * atol  # twice the tolerance off
    bad = tmp_path / "shifted.json"
    RunResults([("pytorch", [IterationResult(shifted, runner_name="pytorch")])]).save(str(bad))
    proc = polygraphy([str(bad) if a == "reference_outputs.json" else a for a in onnxrt], folder)
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr  # the comparison is real


def test_readme_trtexec_and_moe_export_commands(bundles):
    _, _, folder = bundles["vmoe"]
    build = readme_command(folder, "trtexec --onnx=model.onnx")
    assert {"--minShapes=images:8x3x32x32", "--optShapes=images:8x3x32x32", "--maxShapes=images:8x3x32x32"} <= set(
        build
    )
    assert "--noTF32" in build  # trtexec allows TF32 by default: no FP32 parity
    run = readme_command(folder, "trtexec --loadEngine=model.portable.engine")
    assert "--loadInputs=images:images.bin" in run
    text = (folder / "README.md").read_text()
    assert "moe-export build engine" in text and "moe-export validate" in text
    assert "TensorRT >= 10.9" in text and "JetPack 6" in text and "10.3" in text
    assert "JetPack 7" in text and "sm_110" in text and "10.13 to 10.16" in text
    assert 'pip install "numpy<2.4"' in text and "TensorRT >= 11.2" in text
    assert "multiple of 8 images" in text


def test_bundle_plugin_package_imports_from_the_bundle(bundles):
    _, _, folder = bundles["soft"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(folder)}
    code = "import plugins, plugins.register, plugins.aot; print(plugins.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(folder)
    script = (folder / "polygraphy_network.py").read_text()
    assert "register_all()" in script and "model.plugins.onnx" in script
    compile(script, "polygraphy_network.py", "exec")


def test_existing_bundle_is_replaced_and_other_folders_refused(bundles, tmp_path):
    _, _, folder = bundles["soft"]
    other = tmp_path / "not-a-bundle"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a moe-export bundle"):
        build_bundle(from_zoo("soft-moe-tiny"), other)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a CUDA architecture"):
        build_bundle(from_zoo("soft-moe-tiny"), tmp_path / "b", targets=["sm_x"])
    with pytest.raises(UserError, match="not a moe-export bundle"):
        read_manifest(other)


def test_rebuilding_over_a_bundle_replaces_it(bundles, tmp_path):
    dest = tmp_path / "b"
    _, first, folder = bundles["soft"]  # the session's soft-moe-tiny bundle, copied: this test changes it
    shutil.copytree(folder, dest)
    (dest / "stale.txt").write_text("from an old bundle")  # a file the old manifest lists
    manifest = read_manifest(dest)
    manifest["files"]["stale.txt"] = file_entry(dest / "stale.txt")
    (dest / "manifest.json").write_text(json.dumps(manifest))
    (dest / "notes.txt").write_text("the user's")  # one it does not: the bundle is not replaced
    with pytest.raises(UserError, match=r"also holds files moe-export did not write \(notes.txt\)"):
        build_bundle(from_zoo("soft-moe-tiny", seed=1), dest, targets=["sm_90"])
    (dest / "notes.txt").unlink()
    second = build_bundle(from_zoo("soft-moe-tiny", seed=1), dest, targets=["sm_90"])
    assert not (dest / "stale.txt").exists()
    assert second.files["model.onnx"]["sha256"] != first.files["model.onnx"]["sha256"]
    assert read_manifest(dest)["model"]["source"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_a_graph_that_fails_parity_writes_no_bundle(tmp_path, monkeypatch):
    import exporter.parity.parity as parity_module  # the bundle's comparison (onnx_parity) calls it

    real = parity_module.compare_to_reference

    def wrong(reference, actual, header, **kwargs):
        actual = {k: (v + 1 if k == "logits" else v) for k, v in actual.items()}
        return real(reference, actual, header, **kwargs)

    monkeypatch.setattr(parity_module, "compare_to_reference", wrong)
    with pytest.raises(CheckFailed, match="do not match PyTorch") as failed:
        build_bundle(from_zoo("soft-moe-tiny"), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    # the message says why (the worst line of each failed graph's table), and carries the tables
    assert set(failed.value.reports) == {"model.onnx", "model.plugins.onnx"}
    worst = failed.value.reports["model.onnx"].outputs[0]
    assert not worst.passed and f"model.onnx: logits max rel err {worst.max_rel:.3g} (tolerance 0.0001)" in str(
        failed.value
    )


@pytest.mark.parametrize("key", list(MODELS))
def test_stored_reference_is_pytorch_on_the_sample(bundles, key, tmp_path):
    """On the target, engines are checked against the outputs the bundle stores: the same comparison
    as against a fresh PyTorch run, and refused when a file no longer matches its hash."""
    import shutil

    import onnx

    from exporter.backends.onnxruntime import run_onnxruntime
    from exporter.parity.parity import compare_to_reference, reference_run, stored_reference

    source, _, folder = bundles[key]
    header = onnx.load(str(folder / "model.plugins.onnx"), load_external_data=False)
    stored = stored_reference(folder)
    fresh = reference_run(source, header, inputs_npz=str(folder / "inputs.npz"))
    actual = run_onnxruntime(folder / "model.plugins.onnx", {stored.input_name: stored.images})
    a = compare_to_reference(stored, actual, header, graph="g", backend="onnxruntime-cpu")
    b = compare_to_reference(fresh, actual, header, graph="g", backend="onnxruntime-cpu")
    assert a.passed and [o.max_rel for o in a.outputs] == [o.max_rel for o in b.outputs]
    assert [(r.layer, r.decisions, r.slot) for r in a.routing] == [(r.layer, r.decisions, r.slot) for r in b.routing]
    assert len(a.routing) == (2 if key == "vmoe" else 0) and "stored in" in stored.stored

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    with np.load(copy / "reference_outputs.npz") as data:
        changed = {k: v for k, v in data.items()}
    changed["logits"] = changed["logits"] * 0
    np.savez(copy / "reference_outputs.npz", **changed)
    with pytest.raises(UserError, match="changed since the bundle was built"):
        stored_reference(copy)


def test_engine_profile_must_cover_the_sample_batch(bundles):
    from exporter.backends.tensorrt import EngineOptions
    from exporter.deploy.engines import build_bundle_engine

    _, _, folder = bundles["vmoe"]
    with pytest.raises(UserError, match="8 sample images are outside the batch profile 16-32"):
        build_bundle_engine(folder, EngineOptions(min_batch=16, max_batch=32))


def test_an_fp16_bundle_holds_fp16_graphs_and_says_so(tmp_path):
    """--precision fp16: both graphs FP16 with the routing in FP32, checked on CPU with FP16's
    tolerances; only the FP16 token kernels are precompiled (a strongly typed build asks for no
    other); the manifest and the README say so."""
    import onnx

    from exporter.formats.graph import precision

    source = from_zoo("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    result = build_bundle(source, tmp_path / "b", targets=[87], precision="fp16")
    assert result.passed and result.precision == "fp16"
    folder = result.path
    for name in ("model.onnx", "model.plugins.onnx"):
        assert precision(onnx.load(str(folder / name), load_external_data=False)) == ("fp16", "fp32")
    manifest = read_manifest(folder)
    assert manifest["precision"] == "fp16" and manifest["routing_precision"] == "fp32"
    assert manifest["graphs"]["portable"]["casts"] == 6 and manifest["graphs"]["portable"]["fp32_nodes"]["routing"] > 0
    assert all(p["precision"] == "fp16" and p["passed"] for p in manifest["parity_cpu"].values())
    dtypes = {dtype for *_, dtype in plugin_node_shapes(folder / "model.plugins.onnx", seed=0)}
    assert dtypes == {"float32", "float16"}  # FP32 router inputs, FP16 tokens
    kernels = [f for f in (folder / "ptx").rglob("*.ptx")]
    assert len(kernels) == result.ptx_kernels == 3  # route (FP32 gates), dispatch and combine (FP16)
    readme = (folder / "README.md").read_text()
    assert "Precision: **fp16** graphs" in readme and "strongly typed" in readme
    assert f"<= {settings.TOLERANCES['fp16'].rtol:g} x max" in readme


def test_a_bf16_dispatch_bundle_builds_with_its_roundings_accounted(tmp_path):
    """vmoe-tiny with bf16 dispatch at 32 sample images: against PyTorch's own rounding both graphs miss
    FP32's tolerance (3.4e-4, 61 elements rounded the other way at a midpoint); against PyTorch rounding
    as the graph did they pass it, so the bundle is written, its README saying what an engine cannot show."""
    result = build_bundle(from_zoo("vmoe-tiny", bf16_dispatch=True), tmp_path / "b", batch=32, targets=[90])
    assert result.passed and set(result.parity) == {"model.onnx", "model.plugins.onnx"}
    for parity in result.parity.values():
        assert parity["bf16_rounded_at_midpoint"] > 0 and parity["max_rel_err"] <= settings.FP32_TOLERANCES.rtol
        assert parity["routing_decisions"] == 1.0
    assert "bf16 dispatch" in (tmp_path / "b" / "README.md").read_text()
    assert read_manifest(tmp_path / "b")["parity_cpu"] == result.parity
