"""Swin-MoE configs: Swin's YAML, the zoo entries, the checks, the record a graph keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import UserError
from exporter.sources.loading import ModelSource, from_zoo
from exporter.sources.swin_moe import SWIN_MOE_ZOO, SwinMoEConfig, from_yaml, matching_config
from exporter.sources.zoo import ZOO, build_model, config_from_dict, get_config, param_count

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "swin_moe"


def test_the_zoo_has_the_released_configs():
    released = {n for n, c in SWIN_MOE_ZOO.items() if "released" in c.tags}
    assert released == {f"swin-moe-{s}-e{e}" for s in "sb" for e in (8, 16, 32)} | {
        "swin-moe-s-e32-cosine",
        "swin-moe-b-e32-cosine",
    }
    assert set(SWIN_MOE_ZOO) <= set(ZOO)
    s32 = get_config("swin-moe-s-e32")
    assert (s32.image_size, s32.window_size, s32.embed_dim, s32.num_experts, s32.k) == (192, 12, 96, 32, 1)
    assert (s32.capacity_factor, s32.batch_priority, s32.normalize_gate, s32.mlp_fc2_bias) == (1.25, True, False, False)
    assert s32.moe_layer_names()[0] == "layers.2.blocks.1.mlp" and len(s32.moe_layer_names()) == 10
    assert round(param_count(s32) / 1e6, 1) == 541.8


def test_a_yaml_with_base_files_and_swins_defaults(tmp_path):
    (tmp_path / "base.yaml").write_text((FIXTURES / "linear.yaml").read_text().replace("TOP_VALUE: 1", "TOP_VALUE: 2"))
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nMODEL:\n  SWIN_MOE:\n    USE_BPR: False\n")
    config, swin = from_yaml(tmp_path / "child.yaml", num_experts=4)
    assert config.k == 2 and not config.batch_priority and config.num_experts == 4
    assert swin["NUM_LOCAL_EXPERTS"] == 2 and config.cosine_router_dim == 256  # Swin's default
    assert matching_config(config) is None
    assert matching_config(from_yaml(FIXTURES / "linear.yaml", num_experts=4)[0]) is ZOO["swin-moe-tiny"]


def test_classes_come_from_the_dataset_when_the_yaml_does_not_say(tmp_path):
    text = (FIXTURES / "linear.yaml").read_text().replace("  NUM_CLASSES: 10\n", "")
    (tmp_path / "in1k.yaml").write_text(text)
    (tmp_path / "in22k.yaml").write_text(text.replace("DATASET: imagenet", "DATASET: imagenet22K"))
    assert from_yaml(tmp_path / "in1k.yaml", num_experts=4)[0].num_classes == 1000
    assert from_yaml(tmp_path / "in22k.yaml", num_experts=4)[0].num_classes == 21841


def test_swin_configs_refuse_v_moe_settings_and_bad_shapes():
    tiny = get_config("swin-moe-tiny")
    with pytest.raises(UserError, match="group_images .*whole batch"):
        tiny.replace(group_images=1)
    with pytest.raises(UserError, match="bf16_dispatch"):
        tiny.replace(bf16_dispatch=True)
    with pytest.raises(UserError, match="k must be between 1 and the number of experts"):
        tiny.replace(k=5)
    with pytest.raises(UserError, match="not whole windows"):
        tiny.replace(window_size=3)
    with pytest.raises(UserError, match="names no MoE block"):
        tiny.replace(moe_blocks=((-1,), (-1,)))
    with pytest.raises(UserError, match="names blocks"):
        tiny.replace(moe_blocks=((2,), (0,)))
    assert tiny.replace(capacity_factor=0.0).capacity_factor == 0.0  # tutel's dynamic capacity


def test_a_graphs_record_of_the_model_reads_back():
    source = from_zoo("swin-moe-tiny", k=2, capacity_factor=0.5)
    back = ModelSource.from_json(source.to_json())
    assert isinstance(back.config, SwinMoEConfig) and back.config == source.config
    assert back.config.k == 2 and back.input_shape == (3, 32, 32)
    assert "ImageNet-normalised" in back.preprocessing
    assert config_from_dict(json.loads(json.dumps(ZOO["vmoe-tiny"].to_dict()))) == ZOO["vmoe-tiny"]


@pytest.mark.parametrize("name", sorted(SWIN_MOE_ZOO))
def test_parameter_counts_from_the_architecture(name):
    model = build_model(SWIN_MOE_ZOO[name], device="meta")
    assert sum(p.numel() for p in model.parameters()) == param_count(SWIN_MOE_ZOO[name])
