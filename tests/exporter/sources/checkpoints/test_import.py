"""``moe-export import vmoe`` and the pipeline on its output: export, validate, rewrite, validate, with
the plugin graph still equal to vmoe's own forward pass; every bad checkpoint one line, exit 2,
nothing left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from exporter.errors import UserError
from exporter.formats.graph import routing_output_names
from exporter.models.routing import TopKRouting
from exporter.sources.checkpoints import import_vmoe, load_vmoe_checkpoint, read_model_dir
from tests.helpers import assert_one_line_error, run

from .conftest import GROUP_IMAGES, SOFT, VMOE
from .test_reference import kept_pairs, rel_err


def test_import_writes_weights_and_config(tmp_path):
    result = import_vmoe(VMOE, tmp_path / "m", group_images=GROUP_IMAGES)
    assert sorted(result.files) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "moe-export model" and meta["model"]["group_images"] == GROUP_IMAGES
    assert meta["source"]["checkpoint"] == str(VMOE) and len(meta["source"]["checkpoint_sha256"]) == 64
    assert "[-1, 1]" in meta["preprocessing"]
    config, weights = read_model_dir(tmp_path / "m")
    model = load_vmoe_checkpoint(VMOE, group_images=GROUP_IMAGES)
    state = load_file(weights)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob(".m.*"))  # nothing left beside it
    from exporter.fileio import current_umask

    for path in (tmp_path / "m", weights, tmp_path / "m" / "config.json"):  # the umask's, not mkdtemp's 0700
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~current_umask(), path


def test_an_imported_model_is_named_after_its_checkpoint_and_family_and_records_its_fields(tmp_path):
    import_vmoe(VMOE, tmp_path / "v")
    import_vmoe(SOFT, tmp_path / "s")
    vmoe, soft = (json.loads((tmp_path / d / "config.json").read_text())["model"] for d in ("v", "s"))
    assert (vmoe["name"], soft["name"]) == ("vmoe-vmoe_small", "soft-moe-soft_small")
    assert soft["summary"] == "imported vmoe checkpoint soft_small (Soft-MoE)"
    vmoe_only = {"k", "capacity_factor", "batch_priority", "group_images", "ceil_or_round", "multiple_of"}
    assert not vmoe_only & set(soft) and soft["slots_per_expert"] == 2
    assert vmoe_only <= set(vmoe) and "slots_per_expert" not in vmoe
    assert read_model_dir(tmp_path / "s")[0].slots_per_expert == 2  # read back whole
    assert import_vmoe(SOFT, tmp_path / "n", name="mine").config["name"] == "mine"


def test_import_replaces_an_import_and_refuses_other_folders(tmp_path):
    import_vmoe(VMOE, tmp_path / "m")
    import_vmoe(SOFT, tmp_path / "m")
    assert read_model_dir(tmp_path / "m")[0].family == "soft_moe"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a moe-export model folder"):
        import_vmoe(VMOE, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def _ort(graph: Path, images: np.ndarray) -> dict:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images})))


def test_pipeline_on_an_imported_checkpoint_matches_the_reference(tmp_path, reference):
    """import -> export -> validate -> rewrite -> validate, with bfloat16 dispatch, BPR and dropped
    tokens; the plugin graph's logits and routing are vmoe's own (fixture), not only PyTorch's."""
    model_dir, graph, plugins = tmp_path / "m", tmp_path / "m.onnx", tmp_path / "m.plugins.onnx"
    options = ["--group-images", GROUP_IMAGES, "--capacity-factor", 1.0, "--bf16-dispatch"]
    assert run("import", "vmoe", f"{VMOE}.index", "-o", model_dir, *options).exit_code == 0
    result = run("export", "--model", model_dir, "--routing-outputs", "-o", graph)
    assert result.exit_code == 0, result.output
    for path in (graph, plugins):
        if path == plugins:
            result = run("rewrite", graph, "-o", plugins)
            assert result.exit_code == 0, result.output
        result = run("validate", path, "--batch", 4, "--json", tmp_path / "report.json")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["passed"] and [r["agreement"] for r in report["routing"]] == [1.0, 1.0]
    images = np.ascontiguousarray(reference["images"].transpose(0, 3, 1, 2))
    outputs = _ort(plugins, images)
    assert rel_err(outputs["logits"], reference["vmoe_cf1.0_vanilla_bf16/logits"]) < 1e-5
    for layer in ("1", "3"):
        expert, kept, slot = (outputs[n].astype(np.int64) for n in routing_output_names(f"blocks.{layer}.mlp"))
        slot = np.where(kept > 0, slot, -1)
        ours = kept_pairs(TopKRouting(torch.from_numpy(expert), torch.from_numpy(slot), torch.zeros(slot.shape)))
        expected = reference[f"vmoe_cf1.0_vanilla_bf16/encoderblock_{layer}"]
        assert (expected[..., 0] < 0).any() and np.array_equal(ours, expected)


def test_checkpoint_prefix_directly_and_a_model_folder(tmp_path):
    """--checkpoint PREFIX alone describes the model; the Soft-MoE exports and validates too."""
    graph = tmp_path / "soft.onnx"
    result = run("export", "--checkpoint", SOFT, "--bf16-dispatch", "-o", graph)
    assert result.exit_code == 0, result.output
    assert run("validate", graph, "--json", tmp_path / "report.json").exit_code == 0
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "soft-moe-soft_small"
    header = json.loads(
        {p.key: p.value for p in __import__("onnx").load(graph, load_external_data=False).metadata_props}[
            "moe_export.source"
        ]
    )
    assert not Path(header["checkpoint"]).is_absolute()  # recorded relative to the graph
    assert (graph.parent / header["checkpoint"]).resolve() == SOFT.resolve() and header["config"]["bf16_dispatch"]


def test_a_zoo_model_refuses_a_checkpoint_of_another_architecture(tmp_path):
    result = run("export", "--model", "vmoe-tiny", "--checkpoint", VMOE, "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "vmoe_small", "is not a vmoe-tiny")
    assert not list(tmp_path.iterdir())


def _copy(tmp_path: Path, prefix: Path) -> Path:
    for f in prefix.parent.glob(f"{prefix.name}.*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / prefix.name


def _rename_head(prefix: Path) -> None:
    """A tree that is not a ViT-MoE: ``head`` renamed (the leaf order stays the same)."""
    index = Path(f"{prefix}.index")
    content = msgpack.unpackb(index.read_bytes(), raw=False)  # extension objects pass through unchanged
    content["index"]["heads_out"] = content["index"].pop("head")
    index.write_bytes(msgpack.packb(content, use_bin_type=True))


@pytest.mark.parametrize(
    "breakage,fragments",
    [
        (lambda p: Path(f"{p}.data-00001-of-00003").unlink(), ["missing", "vmoe_small.data-00001-of-00003"]),
        (
            lambda p: Path(f"{p}.data-00000-of-00003").write_bytes(Path(f"{p}.data-00000-of-00003").read_bytes()[:999]),
            ["truncated", "vmoe_small.data-00000-of-00003"],
        ),
        (lambda p: Path(f"{p}.index").write_bytes(b"\x00garbage"), ["corrupt", "vmoe_small.index"]),
        (lambda p: Path(f"{p}.index").unlink(), ["no vmoe checkpoint", "vmoe_small.index"]),
        (_rename_head, ["not a ViT-MoE", "head/kernel"]),
    ],
)
def test_bad_checkpoints_give_one_line_and_leave_nothing(tmp_path, breakage, fragments):
    source = tmp_path / "src"
    source.mkdir()
    prefix = _copy(source, VMOE)
    breakage(prefix)
    out = tmp_path / "out"
    assert_one_line_error(run("import", "vmoe", prefix, "-o", out), *fragments)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert_one_line_error(run("export", "--checkpoint", prefix, "-o", tmp_path / "x.onnx"), *fragments[:1])


def test_orbax_checkpoint_says_how_to_convert(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "manifest.ocdbt").write_bytes(b"")
    assert_one_line_error(run("import", "vmoe", tmp_path / "ckpt", "-o", tmp_path / "out"), "Orbax", "save_checkpoint")


def test_a_released_zoo_model_takes_its_real_checkpoint(tmp_path):
    """--model vmoe-s32-last2-ilsvrc2012 --checkpoint PREFIX: a checkpoint in the released model's
    real tree (seeded weights, written in vmoe's format) loads into the zoo entry, every leaf used."""
    from exporter.sources.checkpoints.vmoe_format import write_checkpoint
    from exporter.sources.loading import from_zoo, load

    from .test_vit_moe import RELEASED

    shapes = RELEASED["vmoe_s32_last2_ilsvrc2012_randaug_light1"]["params"]
    rng = np.random.default_rng(1)
    params = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in shapes.items()}
    write_checkpoint(tmp_path / "s32", params, shards=2)
    loaded = load(from_zoo("vmoe-s32-last2-ilsvrc2012", checkpoint=str(tmp_path / "s32")))
    state = loaded.module.state_dict()
    assert torch.equal(state["head.weight"], torch.from_numpy(params["head/kernel"].T))
    assert torch.equal(
        state["blocks.7.mlp.experts.w2"], torch.from_numpy(params["Encoder/encoderblock_7/Moe/Mlp/Dense_1/kernel"])
    )
    assert loaded.source.config.capacity_factor == 4.0 and loaded.routing_layers == ["blocks.5.mlp", "blocks.7.mlp"]
    with pytest.raises(UserError, match="its image_size is 224, not 384"):
        load(from_zoo("vmoe-s32-last2-ilsvrc2012-ft-384", checkpoint=str(tmp_path / "s32")))


def test_checkpoint_alone_that_is_not_a_vmoe_checkpoint(tmp_path):
    assert_one_line_error(
        run("export", "--checkpoint", tmp_path / "w.safetensors", "-o", tmp_path / "x.onnx"), "does not exist"
    )
    (tmp_path / "w.safetensors").write_bytes(b"")
    result = run("export", "--checkpoint", tmp_path / "w.safetensors", "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "holds weights only", "--model")
    assert_one_line_error(
        run("export", "--checkpoint", tmp_path / "nothing", "-o", tmp_path / "x.onnx"), "no vmoe checkpoint"
    )
