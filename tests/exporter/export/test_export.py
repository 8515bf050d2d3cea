"""Export: dynamic batch in routing groups, metadata, routing outputs, checker, atomic writes."""

from __future__ import annotations

import json

import onnx
import pytest

from exporter.backends.tensorrt_rtx import rtx_available
from exporter.export.export import export_onnx
from exporter.formats.graph import SOURCE_KEY as METADATA_KEY
from exporter.sources.loading import ModelSource, from_zoo, load


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_vmoe_graph_batches_in_routing_groups(exported):
    source, result = exported("vmoe-tiny")
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 18
    assert _dims(model.graph.input[0]) == ["8*groups", 3, 32, 32]
    assert _dims(model.graph.output[0]) == ["8*groups", 10]
    routing = [o for o in model.graph.output if o.name.startswith("routing.")]
    assert [o.name for o in routing] == [
        f"routing.blocks.{i}.mlp.{f}" for i in (1, 3) for f in ("expert_index", "kept", "buffer_slot")
    ]
    assert _dims(routing[0]) == ["groups", 8 * 65, 2]
    assert result.findings == [] and result.dynamic_batch


def test_soft_moe_graph_batches_in_images(exported):
    _, result = exported("soft-moe-tiny", routing_outputs=False)
    model = onnx.load(str(result.path))
    assert _dims(model.graph.input[0]) == ["batch", 3, 32, 32]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_graph_records_its_source(exported):
    source, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    recorded = ModelSource.from_json(meta[METADATA_KEY])
    assert recorded == source
    assert recorded.config.capacity_factor == 0.5 and recorded.config.batch_priority
    assert json.loads(meta["moe_export.routing_layers"]) == ["blocks.1.mlp", "blocks.3.mlp"]


def test_node_names_keep_the_module_scopes(exported):
    _, result = exported("vmoe-tiny")
    model = onnx.load(str(result.path))
    scopes = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "namespace"}
    for stage in ("router", "routing", "dispatch", "experts", "combine"):
        assert any(f"blocks.1.mlp.{stage}" in s for s in scopes), stage


def test_export_is_atomic_when_a_late_step_fails(tmp_path, monkeypatch):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"previous")

    def broken_checker(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated failure after writing")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export_onnx(load(from_zoo("soft-moe-tiny")), dest)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary leftovers


def test_opset_below_18_is_refused(tmp_path):
    from exporter.errors import UserError

    with pytest.raises(UserError, match="opset"):
        export_onnx(load(from_zoo("soft-moe-tiny")), tmp_path / "m.onnx", opset=17)


def test_folded_linear_weights_keep_their_parameter_names(exported):
    _, result = exported("vmoe-tiny")
    names = {i.name: list(i.dims) for i in onnx.load(str(result.path)).graph.initializer}
    assert names["blocks.1.mlp.router.weight.T"] == [32, 4]
    assert names["blocks.1.mlp.experts.w1"] == [4, 32, 64]
    assert names.get("head.weight") == [10, 32] or names.get("head.weight.T") == [32, 10]


def test_export_model_is_what_the_export_command_runs(tmp_path):
    from exporter.commands.choice import ModelChoice, resolve
    from exporter.export.export import export_model
    from exporter.formats.graph import metadata

    choice = ModelChoice(model="vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    result = export_model(resolve(choice), tmp_path / "t.onnx", routing_outputs=True)
    recorded = ModelSource.from_json(metadata(onnx.load(str(result.path), load_external_data=False))[METADATA_KEY])
    assert recorded == from_zoo("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    assert result.routing_layers == ["blocks.1.mlp", "blocks.3.mlp"] and not result.findings


@pytest.mark.skipif(rtx_available() is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")
@pytest.mark.parametrize("name", ["vmoe-tiny", "soft-moe-tiny"])
def test_export_reports_the_rtx_parsers_word_beside_the_allow_list(exported, name):
    _, result = exported(name)
    assert result.findings == [] and result.rtx_parse["parsed"] and result.rtx_parse["errors"] == []
    assert result.rtx_parse["layers"] > 0 and result.rtx_parse["version"].startswith("1.")
    assert json.loads(json.dumps(result.to_dict()))["rtx_parse"] == result.rtx_parse


def test_a_fixed_batch_keeps_the_reshapes_a_matmul_needs(tmp_path):
    """onnxscript's rule that drops Reshapes around a MatMul never compared the contracted dimensions
    (``[1,N,1] x [N,D]`` taken for ``[N,1,1] x [N,1,D]``): a fixed-batch graph came out invalid. Without it,
    the graph is valid and equals PyTorch."""
    import importlib.util

    import numpy as np
    import torch

    from exporter.backends.onnxruntime import run_onnxruntime
    from exporter.commands.choice import ModelChoice, resolve
    from exporter.export.export import export_model

    (tmp_path / "fixed.py").write_text(
        "import torch\n"
        "class Gated(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.proj = torch.nn.Linear(8, 8)\n"
        "    def forward(self, images):\n"
        "        x = images.reshape(2, 96, 8)  # fixes the batch at 2\n"
        "        weight = torch.sigmoid(x[..., :1]).reshape(1, 192, 1).reshape(192, 1, 1)\n"
        "        picked = self.proj(x).reshape(192, 8).reshape(192, 1, 8)\n"
        "        return torch.matmul(weight, picked).reshape(1, 192, 8).reshape(2, 96, 8)\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return Gated().eval()\n"
    )
    choice = ModelChoice(module=f"{tmp_path / 'fixed.py'}:build", input_shape="2,3,16,16")
    result = export_model(resolve(choice), tmp_path / "f.onnx", example_batch=choice.batch)
    assert not result.dynamic_batch
    images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = run_onnxruntime(result.path, {"images": images})
    with torch.no_grad():
        spec = importlib.util.spec_from_file_location("fixed", tmp_path / "fixed.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        want = module.build()(torch.from_numpy(images)).numpy()
    assert np.allclose(next(iter(got.values())), want, atol=1e-5)
