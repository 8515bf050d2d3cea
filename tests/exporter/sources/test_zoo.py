"""Zoo configs: parameter counts equal the papers' tables; MoE placement equals the reference."""

from __future__ import annotations

import dataclasses

import pytest

from exporter.errors import UserError
from exporter.sources.zoo import (
    SOFT_MOE,
    VMOE,
    ZOO,
    ModelConfig,
    build_model,
    every,
    get_config,
    last,
    last_half,
    param_count,
)

JFT_VMOE, JFT4B = 18291, 29593
VIT = dict(
    S32=dict(patch_size=32, dim=512, mlp_dim=2048, heads=8, layers=8),
    B16=dict(patch_size=16, dim=768, mlp_dim=3072, heads=12, layers=12),
    L16=dict(patch_size=16, dim=1024, mlp_dim=4096, heads=16, layers=24),
    H14=dict(patch_size=14, dim=1280, mlp_dim=5120, heads=16, layers=32),
    S16=dict(patch_size=16, dim=384, mlp_dim=1536, heads=6, layers=12),
)


def vmoe(size, moe_layers, experts=32):
    return ModelConfig(
        f"vmoe-{size}",
        VMOE,
        "",
        image_size=224,
        **VIT[size],
        moe_layers=moe_layers,
        num_experts=experts,
        num_classes=JFT_VMOE,
        representation_size=VIT[size]["dim"],
    )


def soft(size, experts=128):
    layers = VIT[size]["layers"]
    return ModelConfig(
        f"soft-{size}",
        SOFT_MOE,
        "",
        image_size=224,
        **VIT[size],
        moe_layers=last_half(layers),
        num_experts=experts,
        num_classes=JFT4B,
        classifier="gap",
        qk_norm=True,
    )


# (config, dense ViT in millions, MoE model, unit) from moe-semantics.md §5.1 (the papers' tables)
PAPER_ROWS = [
    (vmoe("S32", every(2, 8)), 36.5, 296.9, 1e6),
    (vmoe("B16", every(2, 12)), 100.5, 979.0, 1e6),
    (vmoe("L16", every(2, 24)), 323.1, 3446.0, 1e6),
    (vmoe("H14", last(5, 32)), 655.8, 2688.6, 1e6),
    (soft("S16"), 33.1, 0.93, 1e9),
    (soft("B16"), 108.6, 3.71, 1e9),
    (soft("L16"), 333.6, 13.13, 1e9),
    (soft("H14"), 668.7, 27.3, 1e9),
    (soft("H14", experts=256), 668.7, 54.2, 1e9),
]


@pytest.mark.parametrize(
    "config, vit_m, moe, unit", PAPER_ROWS, ids=[f"{r[0].name}-E{r[0].num_experts}" for r in PAPER_ROWS]
)
def test_parameter_counts_equal_the_papers(config, vit_m, moe, unit):
    dense = dataclasses.replace(config, moe_layers=())
    digits = len(str(moe).split(".")[1])
    assert round(param_count(dense) / 1e6, 1) == vit_m
    assert round(param_count(config) / unit, digits) == moe


@pytest.mark.parametrize(
    "config", [r[0] for r in PAPER_ROWS[:2]] + [r[0] for r in PAPER_ROWS[4:6]], ids=lambda c: c.name
)
def test_built_models_have_the_formula_parameter_count(config):
    model = build_model(config, device="meta")  # allocates nothing
    assert sum(p.numel() for p in model.parameters()) == param_count(config)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_builds_with_the_formula_parameter_count(name):
    model = build_model(ZOO[name], device="meta")
    assert sum(p.numel() for p in model.parameters()) == param_count(ZOO[name])


def test_zoo_has_the_paper_headline_counts():
    assert round(param_count(ZOO["vmoe-b16-every2-e32"]) / 1e6, 1) == 979.0
    assert round(param_count(ZOO["soft-moe-s16-e128"]) / 1e9, 2) == 0.93
    assert round(param_count(ZOO["soft-moe-b16-e128"]) / 1e9, 2) == 3.71


def test_moe_placement_matches_the_reference_configs():
    assert every(2, 12) == (1, 3, 5, 7, 9, 11)
    assert last(2, 8) == (5, 7)  # S/32 Last-2
    assert last(5, 32) == (23, 25, 27, 29, 31)  # H/14 Last-5
    assert last_half(12) == (6, 7, 8, 9, 10, 11)
    assert ZOO["vmoe-s32-last2-e8"].moe_layers == (5, 7)


def test_overrides_are_checked():
    with pytest.raises(UserError, match="k must be"):
        get_config("vmoe-tiny").replace(k=5)
    with pytest.raises(UserError, match="capacity factor"):
        get_config("vmoe-tiny").replace(capacity_factor=0)
    with pytest.raises(UserError, match="only apply to V-MoE"):
        get_config("soft-moe-tiny").replace(k=1)
    with pytest.raises(UserError, match="unknown model"):
        get_config("vmoe-huge")


def test_config_round_trips_through_json_dict():
    config = get_config("vmoe-tiny").replace(capacity_factor=0.5, batch_priority=True)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_zoo_rows_are_what_models_lists():
    from exporter.sources.zoo import zoo_rows

    rows = zoo_rows()
    assert [r["name"] for r in rows] == list(ZOO)
    assert all(r["params"] == param_count(ZOO[r["name"]]) and r["summary"] for r in rows)
