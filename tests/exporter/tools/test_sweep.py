"""The capacity sweep: properties that must hold whatever the model (fewer drops as capacity grows,
nothing dropped and vanilla = BPR at unlimited capacity), the plot, and the exported graph's parity."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from exporter.errors import UserError
from exporter.sources.loading import from_zoo
from exporter.tools.sweep import plot_sweep, sweep_capacity

ROOT = Path(__file__).resolve().parents[3]
VMOE_CKPT = str(ROOT / "samples" / "02_digits" / "vmoe_digits.safetensors")


@pytest.fixture(scope="module")
def report():
    return sweep_capacity(from_zoo("vmoe-tiny", checkpoint=VMOE_CKPT), capacity_factors=(2.0, 0.25, 1.0), parity=False)


def test_sweep_points_and_monotone_drops(report):
    assert [(p.capacity_factor, p.batch_priority) for p in report.points] == [
        (c, b) for c in (0.25, 1.0, 2.0) for b in (False, True)
    ]
    assert report.images == 448 and report.group_images == 8 and report.unlimited_capacity_factor == 2.0
    for bpr in (False, True):
        pts = [p for p in report.points if p.batch_priority == bpr]
        dropped = [p.dropped for p in pts]
        assert dropped == sorted(dropped, reverse=True) and dropped[0] > 0.5
        assert [min(p.capacity.values()) for p in pts] == [68, 260, 520]  # ceil(520*2*C/4), padded to 4
        assert all(0 <= p.dropped_gate_mass <= 1 and 0 <= p.tokens_unrouted <= p.dropped for p in pts)


def test_unlimited_capacity_drops_nothing_and_bpr_equals_vanilla(report):
    vanilla, bpr = (p for p in report.points if p.capacity_factor == 2.0)
    for p in (vanilla, bpr):
        assert p.dropped == 0 and p.dropped_gate_mass == 0 and p.tokens_unrouted == 0
        assert p.deviation == 0 and p.same_prediction == 1.0
        assert p.accuracy == report.unlimited_accuracy
    assert report.unlimited_accuracy > 0.9  # the trained sample, not chance


def test_first_layer_drops_the_same_count_under_both_orders(report):
    # both orders place every first choice before any second choice, and a second choice's position counts
    # every first choice (kept or not): per expert the kept count is the same, only which tokens are kept
    # differs. The second layer sees different inputs, so its count may differ.
    for c in (0.25, 1.0):
        vanilla, bpr = (p for p in report.points if p.capacity_factor == c)
        assert vanilla.dropped_per_layer["blocks.1.mlp"] == bpr.dropped_per_layer["blocks.1.mlp"]


def test_plot_is_written_with_its_size(report, tmp_path):
    size = plot_sweep(report, tmp_path / "sweep.png")
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.size == size == (1300, 390)


def test_parity_of_the_exported_graph_at_a_dropping_capacity():
    report = sweep_capacity(from_zoo("vmoe-tiny", checkpoint=VMOE_CKPT), capacity_factors=(0.5,), parity=True)
    assert report.parity_passed
    vanilla, bpr = report.points
    for p in (vanilla, bpr):
        assert p.parity["passed"] and p.parity["max_rel"] < 1e-4
        assert p.parity["dropped_graph"] == pytest.approx(p.dropped) and p.dropped > 0
    assert vanilla.parity["status"] == "pass" and vanilla.parity["routing_agreement"] == 1.0
    # measured on the shipped weights: two tokens of one group have exactly equal BPR priority in PyTorch
    # and not in ONNX Runtime, so they swap buffer slots; same experts, same drops, same outputs
    assert bpr.parity["status"] in ("pass", "slots differ") and bpr.parity["pairs_differing"] <= 4


def test_bad_sweeps():
    with pytest.raises(UserError, match="needs a V-MoE or Swin-MoE model"):
        sweep_capacity(from_zoo("soft-moe-tiny"), capacity_factors=(1.0,), parity=False)
    with pytest.raises(UserError, match="must be > 0"):
        sweep_capacity(from_zoo("vmoe-tiny"), capacity_factors=(0.0, 1.0), parity=False)
