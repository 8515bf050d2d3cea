"""Routing pictures: the PNG is written with the size and panels the layout reports, the numbers in
its titles are the routing's, and the routing read from an exported graph is PyTorch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exporter.errors import UserError
from exporter.formats.graph import read_header
from exporter.models.capture import run_with_routing
from exporter.models.vmoe import routing_settings, unlimited_capacity_factor, vmoe_layers
from exporter.sources.loading import from_zoo, load
from exporter.tools.inspect_routing import (
    Routing,
    choose_slots,
    inspect_routing,
    onnx_routing,
    patch_grid,
    torch_column,
)

ROOT = Path(__file__).resolve().parents[3]
VMOE_CKPT = ROOT / "samples" / "02_digits" / "vmoe_digits.safetensors"
SOFT_CKPT = ROOT / "samples" / "02_digits" / "soft_moe_digits.safetensors"


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_vmoe_picture_has_one_panel_per_layer_and_setting(tmp_path):
    dest = tmp_path / "routing.png"
    picture = inspect_routing(
        from_zoo("vmoe-tiny", checkpoint=str(VMOE_CKPT)), dest, sample=3, capacity_factors=(0.5, 2)
    )
    layout = picture.layout
    assert (layout.rows, layout.cols, layout.panels) == (2, 5, 10)  # the input, then two factors x two orders
    assert png_size(dest) == (layout.width, layout.height)
    assert layout.titles[:5] == ["blocks.1.mlp | input"] + [
        f"blocks.1.mlp | C={c} {r}" for c in ("0.5", "2") for r in ("vanilla", "BPR")
    ]
    assert "expert" in layout.legend and "shade" in layout.legend and "brightness" in layout.legend
    dropped = {(s["layer"], s["column"]): s["dropped"] for s in picture.stats}
    # a group of one image: 65 tokens, k=2, E=4 -> capacity ceil(65*2*2/4) = 65 at C=2: nothing dropped
    assert all(dropped[(layer, f"C=2 {r}")] == 0 for layer in picture.layers for r in ("vanilla", "BPR"))
    assert all(dropped[(layer, "C=0.5 vanilla")] > 0 for layer in picture.layers)
    assert picture.image == "digits test sample 3 (a 9)" or picture.image.startswith("digits test sample 3")


def test_vanilla_and_bpr_coincide_when_nothing_is_dropped():
    loaded = load(from_zoo("vmoe-tiny", checkpoint=str(VMOE_CKPT)))
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    c = unlimited_capacity_factor(loaded.module)
    assert c == 2.0  # E / k
    vanilla = torch_column(loaded.module, images, Routing(c, False), group_images=1)
    bpr = torch_column(loaded.module, images, Routing(c, True), group_images=1)
    for layer in vanilla.experts:
        assert vanilla.kept[layer].all() and bpr.kept[layer].all()
        np.testing.assert_array_equal(vanilla.experts[layer], bpr.experts[layer])


def test_routing_settings_are_restored_even_after_an_error():
    loaded = load(from_zoo("vmoe-tiny"))
    before = [
        (m.capacity_factor, m.batch_priority, m.routing.batch_priority, m.group_images)
        for _, m in vmoe_layers(loaded.module)
    ]
    with (
        pytest.raises(RuntimeError),
        routing_settings(loaded.module, capacity_factor=0.1, batch_priority=True, group_images=1),
    ):
        assert all(m.routing.batch_priority and m.group_images == 1 for _, m in vmoe_layers(loaded.module))
        raise RuntimeError("boom")
    after = [
        (m.capacity_factor, m.batch_priority, m.routing.batch_priority, m.group_images)
        for _, m in vmoe_layers(loaded.module)
    ]
    assert after == before


def test_onnx_routing_equals_pytorch_routing(exported, tmp_path):
    source, result = exported("vmoe-tiny", group_images=1, capacity_factor=0.5, batch_priority=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, expected = run_with_routing(load(source).module, images)
    actual = onnx_routing(result.path, read_header(result.path), images.numpy())
    assert set(actual) == set(expected) == {"blocks.1.mlp", "blocks.3.mlp"}
    for layer, r in expected.items():
        assert (r.slot < 0).any()  # capacity factor 0.5 drops some pairs: the comparison covers drops
        np.testing.assert_array_equal(actual[layer].expert.numpy(), r.expert.numpy())
        np.testing.assert_array_equal(actual[layer].slot.numpy(), r.slot.numpy())
    dest = tmp_path / "graph.png"
    picture = inspect_routing(source, dest, sample=0, graph=result.path)
    assert (picture.layout.rows, picture.layout.cols) == (2, 3)  # the input, the graph, PyTorch
    assert png_size(dest) == (picture.layout.width, picture.layout.height)
    assert [s["agreement_with_pytorch"] for s in picture.stats] == [1.0] * 4
    assert picture.notes == []  # a graph with groups of one image: no copies needed


def test_soft_moe_picture_slots_and_combine_spread(tmp_path):
    dest = tmp_path / "soft.png"
    picture = inspect_routing(from_zoo("soft-moe-tiny", checkpoint=str(SOFT_CKPT)), dest, sample=0, slots=[0, 3, 15])
    layout = picture.layout
    assert (layout.rows, layout.cols) == (2, 5)  # input, three slots, combine spread
    assert png_size(dest) == (layout.width, layout.height)
    assert layout.colorbars == [  # the dispatch panels of a row share one scale and its bar
        f"{layer} | {what}"
        for layer in ("blocks.2.mlp", "blocks.3.mlp")
        for what in ("dispatch weight, slots 0, 3, 15", "combine spread")
    ]
    assert layout.titles[:5] == ["blocks.2.mlp | input"] + [f"blocks.2.mlp | slot {s}" for s in (0, 3, 15)] + [
        "blocks.2.mlp | combine spread"
    ]
    spreads = [s["mean_effective_slots"] for s in picture.stats if s["slot"] is None]
    assert len(spreads) == 2 and all(1.0 <= v <= 16.0 for v in spreads)
    maxima = [s["max_dispatch"] for s in picture.stats if s["slot"] is not None]
    assert all(1 / 64 <= m <= 1 for m in maxima)  # a softmax over 64 patches has max >= 1/64
    assert [s["expert"] for s in picture.stats if s["slot"] is not None][:3] == [0, 1, 7]  # p = 2 slots per expert


def test_default_slots_are_the_most_concentrated():
    dispatch = np.full((4, 3), 0.25)
    dispatch[:, 1] = [0.7, 0.1, 0.1, 0.1]
    dispatch[:, 2] = [0.4, 0.2, 0.2, 0.2]
    assert choose_slots(dispatch, 2) == [1, 2]


def test_image_file_input_and_bad_inputs(tmp_path):
    png = tmp_path / "digit.png"
    Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((6, 6), np.uint8))).save(png)
    source = from_zoo("vmoe-tiny")
    picture = inspect_routing(source, tmp_path / "a.png", image=str(png), capacity_factors=(1,))
    assert picture.image == str(png) and picture.layout.cols == 3  # the input, vanilla, BPR
    with pytest.raises(UserError, match="does not exist"):
        inspect_routing(source, tmp_path / "b.png", image=str(tmp_path / "missing.png"))
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(UserError, match="not a readable PNG or JPEG"):
        inspect_routing(source, tmp_path / "b.png", image=str(tmp_path / "not.png"))
    with pytest.raises(UserError, match="`sample` must be between 0 and 447"):
        inspect_routing(source, tmp_path / "b.png", sample=448)
    with pytest.raises(UserError, match="slots \\[16\\] out of range"):
        inspect_routing(from_zoo("soft-moe-tiny"), tmp_path / "b.png", slots=[16])
    with pytest.raises(UserError, match="Soft-MoE graphs expose no routing outputs"):
        inspect_routing(from_zoo("soft-moe-tiny"), tmp_path / "b.png", graph=str(png))
    assert not (tmp_path / "b.png").exists()


def test_patch_grid():
    assert patch_grid(65, 32) == (8, 4, 1)  # a class token, then 8x8 patches of 4 pixels
    assert patch_grid(64, 32) == (8, 4, 0)
    with pytest.raises(UserError, match="square grid"):
        patch_grid(50, 32)
