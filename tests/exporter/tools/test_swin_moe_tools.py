"""inspect routing and sweep capacity on Swin-MoE: each MoE layer at its own token grid with its block's
attention windows, the image routed alone (batch 1); the sweep's chunks are its routing groups, and the
exported graph is checked on the same chunks."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import exporter.tools.sweep as sweep_module
from exporter.sources.loading import from_zoo
from exporter.tools.inspect_routing import inspect_routing
from exporter.tools.sweep import sweep_capacity

LAYERS = ["layers.0.blocks.1.mlp", "layers.1.blocks.0.mlp"]


def test_swin_picture_has_one_panel_per_layer_and_setting(tmp_path):
    picture = inspect_routing(from_zoo("swin-moe-tiny"), tmp_path / "r.png", sample=3, capacity_factors=[0.5, 2.0])
    assert picture.family == "swin_moe" and picture.layers == LAYERS
    assert (picture.layout.rows, picture.layout.cols) == (2, 4)
    with Image.open(tmp_path / "r.png") as im:
        assert im.size == (picture.layout.width, picture.layout.height)
    capacity = {(s["layer"], s["column"]): s["capacity"] for s in picture.stats}
    assert capacity[(LAYERS[0], "C=0.5 BPR")] == int(0.5 * 64 / 4)  # one image: 64 tokens, 4 experts
    assert capacity[(LAYERS[1], "C=2 vanilla")] == int(2 * 16 / 4)
    dropped = {(s["layer"], s["column"]): s["dropped"] for s in picture.stats}
    assert dropped[(LAYERS[0], "C=0.5 vanilla")] >= 0.5 > dropped[(LAYERS[0], "C=2 vanilla")]
    assert json.loads(picture.to_json())["family"] == "swin_moe"


def test_swin_graph_routing_is_pictured_beside_pytorch(exported, tmp_path):
    source, result = exported("swin-moe-tiny")
    picture = inspect_routing(source, tmp_path / "g.png", sample=0, graph=result.path)
    assert [c for c in picture.layout.titles if c.startswith(LAYERS[0])] == [
        f"{LAYERS[0]} | ONNX Runtime: {result.path.name}",
        f"{LAYERS[0]} | PyTorch: C=1.25 BPR",
    ]
    assert all(s["agreement_with_pytorch"] == 1.0 for s in picture.stats)


def test_swin_sweep_routes_each_chunk_as_one_group_and_the_graph_agrees(monkeypatch):
    monkeypatch.setattr(sweep_module.settings, "SWEEP_CHUNK_IMAGES", 8)  # two chunks of 8: two routing groups
    report = sweep_capacity(from_zoo("swin-moe-tiny"), capacity_factors=(0.5,), images=16)
    assert report.images == 16 and report.group_images == 8 and report.unlimited_capacity_factor == 4.0
    for point in report.points:
        assert point.capacity == {LAYERS[0]: int(0.5 * 8 * 64 / 4), LAYERS[1]: int(0.5 * 8 * 16 / 4)}
        assert 0.4 < point.dropped < 0.7
        assert point.parity["status"] == "pass" and point.parity["routing_agreement"] == 1.0
        assert np.isclose(point.parity["dropped_graph"], np.mean(list(point.dropped_per_layer.values())))


def test_swin_sweep_of_fewer_images_than_a_chunk_routes_them_as_one_group():
    report = sweep_capacity(from_zoo("swin-moe-tiny"), capacity_factors=(1.25,), images=8, parity=False)
    assert report.group_images == 8
    assert report.points[0].capacity == {LAYERS[0]: int(1.25 * 8 * 64 / 4), LAYERS[1]: int(1.25 * 8 * 16 / 4)}
