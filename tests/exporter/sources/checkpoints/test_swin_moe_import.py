"""``moe-export import swin-moe`` through the pipeline on Microsoft's fixture checkpoints: import (rank
files or merged file), export with a dynamic batch, validate at two batch sizes (capacity follows the
batch), and the exported graph in ONNX Runtime against Swin's own logits and tutel's own routing. The
bad inputs, through the CLI: one line, exit 2, nothing written."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.backends.onnxruntime import run_onnxruntime
from exporter.formats.graph import INPUT_NAME, TUTEL_LAYERS_KEY, metadata_json, routing_output_names
from exporter.sources.checkpoints import read_model_dir
from tests.helpers import run

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "swin_moe"
REFERENCE = dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The linear fixture imported from its rank files and exported with routing outputs."""
    folder = tmp_path_factory.mktemp("swin")
    result = run(
        "import", "swin-moe", FIXTURES / "linear.pth", "--config", FIXTURES / "linear.yaml", "-o", folder / "m"
    )
    assert result.exit_code == 0, result.output
    result = run("export", "--model", folder / "m", "--routing-outputs", "-o", folder / "m.onnx")
    assert result.exit_code == 0, result.output
    return folder


def test_import_writes_a_model_folder_every_command_takes(pipeline):
    config, weights = read_model_dir(pipeline / "m")
    assert config.family == "swin_moe" and config.num_experts == 4 and config.k == 1 and config.capacity_factor == 1.25
    meta = json.loads((pipeline / "m" / "config.json").read_text())
    assert meta["source"]["checkpoint_files"] == ["linear.pth.rank0", "linear.pth.rank1", "linear.pth.master"]
    assert "ImageNet-normalised" in meta["preprocessing"]
    header = onnx.load(str(pipeline / "m.onnx"), load_external_data=False)
    dims = header.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"  # dynamic: the capacity is computed from it in the graph
    assert metadata_json(header, TUTEL_LAYERS_KEY) == {
        layer: dict(
            routing="tutel",
            group="batch",
            num_experts=4,
            k=1,
            capacity_factor=1.25,
            batch_priority=True,
            normalize_gate=False,
            alignment=1,
        )
        for layer in ("layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp")
    }
    assert not {n.op_type for n in header.graph.node} & {"CumSum", "NonZero", "TopK", "Loop", "If"}


@pytest.mark.parametrize("batch", [1, 8])
def test_validate_at_two_batch_sizes(pipeline, batch):
    result = run("validate", pipeline / "m.onnx", "--batch", batch, "--json", pipeline / f"v{batch}.json")
    assert result.exit_code == 0, result.output
    report = json.loads((pipeline / f"v{batch}.json").read_text())
    assert report["passed"] and report["batch"] == batch and report["routing_status"] == "checked"
    assert [r["layer"] for r in report["routing"]] == ["layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp"]
    assert all(r["agreement"] == 1.0 and r["pairs"] == batch * t for r, t in zip(report["routing"], (64, 16)))


def test_the_graph_reproduces_microsofts_logits_and_routing(pipeline):
    """The exported graph itself, at batch 8 and image by image, against Swin's logits and tutel's
    routing: one graph, the capacity computed from whatever batch it is given."""
    images = REFERENCE["images"]
    for batches, suffix in (([images], ""), ([images[i : i + 1] for i in range(8)], "_single")):
        outputs = [run_onnxruntime(pipeline / "m.onnx", {INPUT_NAME: b}) for b in batches]
        logits = np.concatenate([o["logits"] for o in outputs])
        expected = REFERENCE[f"linear_k1_cf1.25/logits{suffix}"]
        assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4
        for layer in ("layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp"):
            prefix = f"linear_k1_cf1.25/{layer}/" + ("single/" if suffix else "")
            expert_name, kept_name, slot_name = routing_output_names(layer)
            expert = np.concatenate([o[expert_name][0] for o in outputs])
            kept = np.concatenate([o[kept_name][0] for o in outputs])
            slot = np.concatenate([o[slot_name][0] for o in outputs])
            assert np.array_equal(expert, REFERENCE[prefix + "expert"])
            assert np.array_equal(kept, REFERENCE[prefix + "kept"])
            assert np.array_equal(slot[kept], REFERENCE[prefix + "location"][kept])


def test_the_rewrite_replaces_every_moe_layer_with_tutels_rule(pipeline):
    """Every Swin-MoE layer becomes TopKRoute/TopKDispatch/TopKCombine, found by behaviour: the whole batch
    as the group, BPR, and a capacity rule that is tutel's ``k * int(cf * ceil(N / E))`` at every batch up
    to 64 images; the plugin graph reproduces Microsoft's logits and routing, at batch 8 and image by image."""
    from plugins.topk_route.capacity import capacity

    result = run("rewrite", pipeline / "m.onnx", "-o", pipeline / "m.plugins.onnx", "--json", pipeline / "r.json")
    assert result.exit_code == 0, result.output
    plan = json.loads((pipeline / "r.json").read_text())
    assert plan["counts"] == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
    for layer, tokens in zip(plan["layers"], (64, 16)):
        attrs = layer["plugins"][0]["attrs"]
        assert attrs["k"] == 1 and attrs["batch_priority"] == 1 and attrs["capacity"] == 0
        tutel = [int(1.25 * -(-(tokens * b) // 4)) for b in range(1, 65)]
        assert [capacity(tokens * b, attrs) for b in range(1, 65)] == tutel, attrs
    images = REFERENCE["images"]
    for batches, suffix in (([images], ""), ([images[i : i + 1] for i in range(8)], "_single")):
        outputs = [run_onnxruntime(pipeline / "m.plugins.onnx", {INPUT_NAME: b}) for b in batches]
        logits = np.concatenate([o["logits"] for o in outputs])
        expected = REFERENCE[f"linear_k1_cf1.25/logits{suffix}"]
        assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4
        for layer in ("layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp"):
            prefix = f"linear_k1_cf1.25/{layer}/" + ("single/" if suffix else "")
            expert_name, kept_name, slot_name = routing_output_names(layer)
            kept = np.concatenate([o[kept_name][0] for o in outputs])
            assert np.array_equal(np.concatenate([o[expert_name][0] for o in outputs]), REFERENCE[prefix + "expert"])
            assert np.array_equal(kept, REFERENCE[prefix + "kept"])
            slot = np.concatenate([o[slot_name][0] for o in outputs])
            assert np.array_equal(slot[kept], REFERENCE[prefix + "location"][kept])
    for batch in (1, 8):
        result = run("validate", pipeline / "m.plugins.onnx", "--batch", batch, "--json", pipeline / "vp.json")
        assert result.exit_code == 0, result.output
        report = json.loads((pipeline / "vp.json").read_text())
        assert report["passed"] and all(r["agreement"] == 1.0 for r in report["routing"])


def test_a_bundle_of_an_imported_swin_moe(pipeline):
    result = run("build", "bundle", "--model", pipeline / "m", "--target", "sm_89", "-o", pipeline / "bundle")
    assert result.exit_code == 0, result.output
    manifest = json.loads((pipeline / "bundle" / "manifest.json").read_text())
    assert manifest["plugins"]["nodes"] == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}


def test_a_merged_file_with_routing_overrides(tmp_path):
    args = ("import", "swin-moe", FIXTURES / "cosine.merged.pth", "--config", FIXTURES / "cosine.yaml")
    result = run(*args, "--k", 2, "--capacity-factor", 0.5, "-o", tmp_path / "c", "--json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["config"]["k"] == 2 and report["config"]["capacity_factor"] == 0.5
    assert report["config"]["cosine_router"] and report["source"]["checkpoint_files"] == ["cosine.merged.pth"]
    again = run(*args, "-o", tmp_path / "c")  # an earlier import is replaced
    assert again.exit_code == 0 and read_model_dir(tmp_path / "c")[0].k == 1


def test_load_swin_moe_checkpoint_is_the_library_call():
    import exporter

    model = exporter.load_swin_moe_checkpoint(FIXTURES / "linear.merged.pth", config=FIXTURES / "linear.yaml")
    assert not model.training
    with torch.no_grad():
        logits = model(torch.from_numpy(REFERENCE["images"])).numpy()
    expected = REFERENCE["linear_k1_cf1.25/logits"]
    assert np.abs(logits - expected).max() / np.abs(expected).max() <= 1e-4


# --- bad input through the CLI: one line, exit 2, nothing written ----------------------------------


@pytest.fixture
def scene(tmp_path):
    for f in FIXTURES.glob("linear.*"):
        shutil.copy(f, tmp_path / f.name)
    Path(tmp_path / "gone.pth.rank1").write_bytes((FIXTURES / "linear.pth.rank1").read_bytes())
    Path(tmp_path / "gone.pth.master").write_bytes((FIXTURES / "linear.pth.master").read_bytes())
    shutil.copy(FIXTURES / "linear.pth.rank0", tmp_path / "mixed.pth.rank0")
    shutil.copy(FIXTURES / "sharded.pth.rank1", tmp_path / "mixed.pth.rank1")
    shutil.copy(FIXTURES / "linear.pth.master", tmp_path / "mixed.pth.master")
    (tmp_path / "wide.yaml").write_text((FIXTURES / "linear.yaml").read_text().replace("EMBED_DIM: 8", "EMBED_DIM: 12"))
    (tmp_path / "swin.yaml").write_text((FIXTURES / "linear.yaml").read_text().replace("TYPE: swin_moe", "TYPE: swin"))
    (tmp_path / "bad.yaml").write_text("MODEL: [unclosed")
    state = torch.load(FIXTURES / "linear.merged.pth", weights_only=True)["model"]
    torch.save({"model": {k: v for k, v in state.items() if "_moe_layer" not in k}}, tmp_path / "dense.pth")
    torch.save({"model": state, "args": argparse.Namespace(cfg="linear.yaml")}, tmp_path / "pickled.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    return tmp_path


BAD = [
    ("a missing rank file", "{d}/gone.pth --config {d}/linear.yaml", "rank file {d}/gone.pth.rank0 is missing"),
    ("ranks that disagree", "{d}/mixed.pth --config {d}/linear.yaml", "rank files disagree:"),
    (
        "a config that does not match",
        "{d}/linear.pth --config {d}/wide.yaml",
        "does not match the config swin_moe_tiny_linear: patch_embed.proj.weight is [8, 3, 4, 4], the config's [12",
    ),
    ("not a Swin-MoE config", "{d}/linear.pth --config {d}/swin.yaml", "MODEL.TYPE is 'swin', not 'swin_moe'"),
    ("a config that is not YAML", "{d}/linear.pth --config {d}/bad.yaml", "is not YAML"),
    ("a missing config", "{d}/linear.pth --config {d}/none.yaml", "cannot read config"),
    ("not a Swin-MoE checkpoint", "{d}/dense.pth --config {d}/linear.yaml", "is not a Swin-MoE checkpoint"),
    ("a pickled object", "{d}/pickled.pth --config {d}/linear.yaml", "pickles more than tensors"),
    ("not a state dict", "{d}/list.pth --config {d}/linear.yaml", "holds a list, not a state dict"),
    ("no checkpoint", "{d}/none.pth --config {d}/linear.yaml", "does not exist"),
    ("V-MoE options", "{d}/linear.pth --config {d}/linear.yaml --group-images 1", "No such option"),
]


@pytest.mark.parametrize(("case", "args", "fragment"), BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_and_exit_2(scene, case, args, fragment):
    before = sorted(p.name for p in scene.rglob("*"))
    result = run("import", "swin-moe", *args.format(d=scene).split(), "-o", scene / "out")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment.format(d=scene) in errors[0], result.output
    assert sorted(p.name for p in scene.rglob("*")) == before  # nothing written


def test_a_folder_moe_export_did_not_write_is_not_replaced(scene):
    result = run("import", "swin-moe", scene / "linear.pth", "--config", scene / "linear.yaml", "-o", scene / "taken")
    assert result.exit_code == 2 and "is not a moe-export model folder" in result.output
    assert (scene / "taken" / "notes.txt").read_text() == "mine"
