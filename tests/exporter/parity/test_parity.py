"""ONNX Runtime vs PyTorch on tiny models: outputs and routing, with tokens dropped (C < 1), and a
check that a real divergence is reported."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter import settings
from exporter.compare import compare_output
from exporter.parity.parity import ROUTING_CHECKED, ROUTING_NONE, ROUTING_NOT_EXPOSED
from exporter.parity.validate import validate_onnx

VMOE_CASES = [  # (k, batch_priority, group_images): every pair of settings appears at least once
    (1, False, 1),
    (2, False, 8),
    (1, True, 8),
    (2, True, 1),
]


@pytest.mark.parametrize("k, batch_priority, group_images", VMOE_CASES)
def test_tiny_vmoe_parity_with_dropped_tokens(exported, k, batch_priority, group_images):
    source, result = exported(
        "vmoe-tiny", k=k, batch_priority=batch_priority, group_images=group_images, capacity_factor=0.5
    )
    report = validate_onnx(result.path, batch=2 * group_images)
    assert report.passed, report.to_json()
    assert report.routing_status == ROUTING_CHECKED
    assert [r.layer for r in report.routing] == ["blocks.1.mlp", "blocks.3.mlp"]
    for r in report.routing:
        assert r.agreement == 1.0 and r.pairs == 2 * 65 * k * group_images
        assert r.dropped_expected > 0.2  # C = 0.5: at least half the (token, choice) pairs have no slot
    assert report.outputs[0].max_rel <= 1e-4


def test_tiny_soft_moe_parity(exported):
    _, result = exported("soft-moe-tiny")
    report = validate_onnx(result.path, batch=3)
    assert report.passed and report.routing_status == ROUTING_NONE
    assert report.outputs[0].shape == [3, 10]


def test_missing_routing_outputs_are_reported_not_passed_silently(exported):
    _, result = exported("vmoe-tiny", routing_outputs=False)
    report = validate_onnx(result.path)
    assert report.routing_status == ROUTING_NOT_EXPOSED and report.routing == []
    assert any("`routing_outputs=True`" in n for n in report.notes)  # --routing-outputs in the CLI


def test_a_perturbed_router_is_caught_as_a_routing_divergence(exported, tmp_path):
    _, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    model = onnx.load(str(result.path))
    for init in model.graph.initializer:
        if init.name == "blocks.3.mlp.router.weight.T":
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(w + 0.05 * np.sign(w), init.name))
            break
    else:
        raise AssertionError("router weight not found")
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    report = validate_onnx(broken)
    assert not report.passed
    first, second = report.routing
    assert first.passed and first.agreement == 1.0  # the earlier layer is untouched
    assert not second.passed and second.agreement < 1.0


def test_compare_output_flags_shape_and_nan_mismatches():
    a = np.ones((2, 3), np.float32)
    assert compare_output("y", a, a.copy(), 1e-4).passed
    assert not compare_output("y", a, np.ones((3, 2), np.float32), 1e-4).passed
    nan = a.copy()
    nan[0, 0] = np.nan
    assert not compare_output("y", a, nan, 1e-4).passed
    off = a * (1 + 2e-4)
    result = compare_output("y", a, off, 1e-4)
    assert not result.passed and result.max_rel == pytest.approx(2e-4, rel=1e-3)


def _routing_arrays(expert, slot):
    return {
        "routing.l.expert_index": np.array(expert, np.int32),
        "routing.l.kept": np.array(slot) >= 0,
        "routing.l.buffer_slot": np.array(slot, np.int32),
    }


def test_slot_swaps_inside_a_buffer_are_counted_but_changed_decisions_fail():
    import torch

    from exporter.compare import compare_routing
    from exporter.models.routing import TopKRouting

    expert = [[[0], [0], [1], [0]]]
    slot = [[[0], [1], [0], [-1]]]
    ref = TopKRouting(torch.tensor(expert), torch.tensor(slot), torch.ones(1, 4, 1))
    same = compare_routing("l", ref, _routing_arrays(expert, slot), 1.0)
    assert same.passed and same.agreement == 1.0 and same.slot_swaps == 0

    swapped = compare_routing("l", ref, _routing_arrays(expert, [[[1], [0], [0], [-1]]]), 1.0)
    assert swapped.passed and swapped.slot_swaps == 2 and swapped.agreement == 0.5 and swapped.decisions == 1.0

    kept_other = compare_routing("l", ref, _routing_arrays(expert, [[[0], [-1], [0], [1]]]), 1.0)
    assert not kept_other.passed and kept_other.kept == 0.5 and kept_other.slot_swaps == 0
    other_expert = compare_routing("l", ref, _routing_arrays([[[0], [0], [0], [0]]], slot), 1.0)
    assert not other_expert.passed and other_expert.expert == 0.75


# --- bf16 dispatch: elements that float32 noise rounds to the other bfloat16 neighbour -----------------

DIGITS_VMOE = str(Path(__file__).resolve().parents[3] / "samples" / "02_digits" / "vmoe_digits.safetensors")


@pytest.mark.parametrize(
    "overrides, batch",
    [
        ({}, 32),  # seeded vmoe-tiny, vanilla: 61 elements round the other way at batch 32 (3.4e-4 without)
    ],
)
def test_bf16_dispatch_rounding_at_midpoints_keeps_fp32_tolerance(exported, overrides, batch):
    """Measured: against PyTorch's own rounding these graphs miss FP32's 1e-4 by a few bfloat16 steps at
    elements that lie within float32 noise of a rounding midpoint; against PyTorch rounding those
    elements as the graph did they are within 1e-6, routing 100%."""
    _, result = exported("vmoe-tiny", bf16_dispatch=True, **overrides)
    report = validate_onnx(result.path, batch=batch)
    assert report.passed, report.to_json()
    r = report.rounding
    assert r is not None and r.passed and r.roundings == 4 and r.unexplained == 0
    assert 0 < r.at_midpoint < r.elements * 1e-3  # a few elements, not a systematic difference
    assert r.max_rel_before > settings.FP32_TOLERANCES.rtol  # what failed before this was accounted for
    assert report.tolerances == asdict(settings.FP32_TOLERANCES)  # the tolerance is FP32's, unchanged
    assert report.outputs[0].max_rel < 1e-6 and all(x.decisions == 1.0 and x.agreement == 1.0 for x in report.routing)
    assert report.summary()["bf16_rounded_at_midpoint"] == r.at_midpoint
    assert "nothing" not in " ".join(report.notes)


def test_bf16_dispatch_is_analysed_only_where_it_misses_fp32_tolerance(exported):
    """A graph within FP32's tolerance as it is gets no rounding analysis. Which batches hold an element
    at a midpoint depends on float32 noise (ONNX Runtime's kernels, BLAS: vmoe-tiny's batch 8 had none in
    one environment and 18 in another, the digits model's 17 and none), so each graph and batch is judged
    by the path it needed: every one passes, and some pass as they are."""
    as_it_is = 0
    for overrides in ({}, {"checkpoint": DIGITS_VMOE, "batch_priority": True}):
        _, result = exported("vmoe-tiny", bf16_dispatch=True, **overrides)
        for batch in (8, 16):
            report = validate_onnx(result.path, batch=batch)
            assert report.passed, (batch, report.to_json())
            if report.rounding is None:
                as_it_is += 1
                assert report.outputs[0].max_rel <= settings.FP32_TOLERANCES.rtol
            else:  # analysed only because the graph as it is missed the tolerance
                assert report.rounding.max_rel_before > settings.FP32_TOLERANCES.rtol
    assert as_it_is


def _scaled(path, tmp_path, name: str, factor: float):
    model = onnx.load(str(path))
    (init,) = [i for i in model.graph.initializer if i.name == name]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), name))
    out = tmp_path / f"{name}.onnx"
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize(
    "weight, unexplained",
    [
        ("blocks.0.attn.qkv.weight.T", True),  # before the first rounding: most roundings move
        ("head.weight", False),  # after the last one: the roundings agree, the logits do not
    ],
)
def test_a_broken_bf16_dispatch_graph_still_fails(exported, tmp_path, weight, unexplained):
    source, result = exported("vmoe-tiny", bf16_dispatch=True)
    report = validate_onnx(_scaled(result.path, tmp_path, weight, 1.001), source, batch=32)
    assert not report.passed and not report.outputs[0].passed
    assert report.rounding is not None and (report.rounding.unexplained > 0) == unexplained
    assert report.worst().startswith("logits max rel err")


def test_a_graph_that_does_not_round_fails_against_bf16_dispatch(exported):
    """The FP32 graph against the same model with bf16 dispatch: 1.1e-3, with a note saying why."""
    source, result = exported("vmoe-tiny")
    rounding = dataclasses.replace(source, config=source.config.replace(bf16_dispatch=True))
    report = validate_onnx(result.path, rounding, batch=8)
    assert not report.passed and report.rounding is None and report.outputs[0].max_rel > 5e-4
    assert any("rounds nothing" in n and "`bf16_dispatch=True`" in n for n in report.notes)


def test_rounding_as_takes_the_graphs_value_only_next_to_a_midpoint():
    """bfloat16 neighbours of 1.0 are 1 and 1 + 2^-7: the midpoint is 1 + 2^-8."""
    import torch

    from exporter.backends.torch import rounding_as
    from exporter.models.experts import round_to_bfloat16

    mid = 1 + 2**-8
    x = torch.tensor([mid - 1e-7, mid + 1e-7, 1.0, 2.0])  # the first two round to 1 and to 1 + 2^-7
    graph = np.array([1 + 2**-7, 1.0, 1 + 2**-7, 2.0], dtype=np.float32)  # both flipped, and a far one
    with rounding_as([graph], rtol=1e-6) as found:
        out = round_to_bfloat16(x)
    assert found == [(4, 2, 1)]  # 4 elements, 2 at a midpoint, 1 (1.0 -> 1 + 2^-7) unexplained
    assert out.tolist() == [1 + 2**-7, 1.0, 1.0, 2.0]  # the flips taken, the unexplained one not
    assert round_to_bfloat16(x).tolist() == [1.0, 1 + 2**-7, 1.0, 2.0]  # outside the block: plain rounding
