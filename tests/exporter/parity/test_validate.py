"""validate(target): what `moe-export validate` runs, called as a library function, for an ONNX
graph, an engine file and a bundle (the TensorRT runs themselves are GPU-marked elsewhere)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial

import pytest

from exporter import settings
from exporter.backends.tensorrt import TensorRTUnavailable, tensorrt_available
from exporter.commands.choice import ModelChoice, resolve
from exporter.errors import UserError
from exporter.formats.bundle import file_entry
from exporter.parity.validate import validate

NO_TENSORRT = tensorrt_available() is not None


def test_an_onnx_graph_against_the_model_it_records(exported):
    source, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    report = validate(result.path)
    assert report.passed and report.model == "vmoe-tiny" and report.backend == "onnxruntime-cpu"
    assert report.tolerances == {"rtol": settings.TOLERANCES["fp32"].rtol, "routing_agreement": 1.0}
    assert [r.decisions for r in report.routing] == [1.0, 1.0]


def test_choice_overrides_the_recorded_model_and_fails_honestly(exported):
    _, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    other = validate(result.path, changes=partial(resolve, ModelChoice(capacity_factor=4.0)))  # every token kept
    assert not other.passed and any(r.dropped_expected == 0 < r.dropped_actual for r in other.routing)
    assert validate(result.path, changes=partial(resolve, ModelChoice(seed=1))).passed is False  # other weights


def test_tolerance_overrides_replace_only_what_is_given(exported):
    _, result = exported("soft-moe-tiny")
    strict = validate(result.path, rtol=0.0)
    assert strict.tolerances == {"rtol": 0.0, "routing_agreement": 1.0}
    assert strict.passed == all(o.max_abs == 0 for o in strict.outputs)


def test_onnx_option_is_for_engines(exported):
    _, result = exported("soft-moe-tiny")
    with pytest.raises(UserError, match="`engine_graph` applies to engine files"):
        validate(result.path, engine_graph=result.path)


def test_a_bundle_without_an_engine_says_how_to_build_one(bundled, tmp_path):
    _, _, folder = bundled("soft-moe-tiny")
    with pytest.raises(UserError, match="has no engine yet: build it with `moe-export build engine") as refused:
        validate(folder)
    # and the check a CPU machine can run instead, which works as given
    graph, inputs = folder / "model.plugins.onnx", folder / "inputs.json"
    assert f"validate {graph} with `inputs_npz={inputs}`" in str(refused.value)  # --inputs in the CLI's words
    report = validate(graph, inputs_npz=str(inputs))
    assert report.passed and report.batch == settings.DEFAULT_VALIDATE_BATCH_IMAGES


def test_the_batch_given_at_export_is_the_batch_validate_runs(tmp_path):
    """--input-shape N,C,H,W: N is recorded in the graph; --batch (or another N) still wins."""
    from exporter.export.export import export_model
    from exporter.formats.graph import read_header, recorded_batch

    path = tmp_path / "four.onnx"
    export_model(resolve(ModelChoice(model="soft-moe-tiny", input_shape="4,3,32,32")), path, example_batch=4)
    assert recorded_batch(read_header(path)) == 4
    assert validate(path).batch == 4
    assert validate(path, batch=3).batch == 3
    five = ModelChoice(input_shape="5,3,32,32")  # what the command passes for --input-shape 5,3,32,32
    assert validate(path, changes=partial(resolve, five), batch=five.batch).batch == 5


@pytest.mark.skipif(not NO_TENSORRT, reason="checks the refusal where TensorRT is absent")
def test_an_engine_needs_tensorrt_and_says_so(bundled, tmp_path):
    _, _, folder = bundled("soft-moe-tiny")
    bundle = tmp_path / "b"
    shutil.copytree(folder, bundle)
    (bundle / "model.engine").write_bytes(b"not built here")  # the manifest does not record it: a file
    with pytest.raises(TensorRTUnavailable, match="validating an engine needs TensorRT"):
        validate(bundle / "model.engine")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["engine"] = {"file": "model.engine", "graph": "model.plugins.onnx", "precision": "fp32"}
    manifest["files"]["model.engine"] = file_entry(bundle / "model.engine")  # as build engine records it
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorRTUnavailable, match="validating an engine needs TensorRT"):
        validate(bundle)
    alone = tmp_path / "alone.engine"  # no manifest beside it: the graph must be named
    alone.write_bytes(b"x")
    with pytest.raises(UserError, match="give `engine_graph=GRAPH`"):
        validate(alone)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_graphs_validate_with_every_flip_listed_and_explained(exported, precision):
    """FP16 (ONNX Runtime) and BF16 (emulated) graphs against the FP32 model, with the precision's
    tolerances: every flipped decision is counted, listed with its gate margin, and explained."""
    _, result = exported("vmoe-tiny", precision=precision, capacity_factor=0.5, batch_priority=True)
    report = validate(result.path, batch=32)
    assert report.passed, report.to_json()
    assert report.precision == precision and report.routing_precision == "fp32"
    assert report.tolerances == dataclasses.asdict(settings.TOLERANCES[precision])
    assert report.backend == ("onnxruntime-cpu (bf16 emulated)" if precision == "bf16" else "onnxruntime-cpu")
    for layer in report.routing:
        differing = round((1 - layer.decisions) * layer.pairs)
        assert layer.flip_count == differing == sum(layer.causes.values()) == len(layer.flips)
        assert layer.unexplained == 0 and 0 < layer.gate_error < 0.5
        for flip in layer.flips:
            if flip["kind"] == "expert":  # the two experts' gates were closer than the graph moved them
                assert flip["cause"] == "gates" and flip["margin"] <= flip["error"]
            assert flip["output_error"] is not None
    assert report.summary()["routing_flips"] == sum(r.flip_count for r in report.routing)


def test_an_fp32_graph_has_no_flips_and_exact_gates(exported):
    _, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    report = validate(result.path, batch=32)
    assert report.passed and report.precision == "fp32"
    assert all(r.flip_count == 0 and r.gate_error < 1e-6 for r in report.routing)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_soft_moe_dispatch_and_combine_weights_are_compared_per_layer(exported, precision):
    _, fp32 = exported("soft-moe-tiny")
    _, reduced = exported("soft-moe-tiny", precision=precision)
    exact, report = validate(fp32.path), validate(reduced.path)
    assert report.passed and [s.layer for s in report.soft_routing] == ["blocks.2.mlp", "blocks.3.mlp"]
    assert all(s.dispatch_max_abs < 1e-6 and s.combine_max_abs < 1e-6 for s in exact.soft_routing)
    bound = {"fp16": 1e-3, "bf16": 1e-2}[precision]  # of weights up to 1, from tokens rounded upstream
    assert all(0 < s.dispatch_max_abs < bound and 0 < s.combine_max_abs < bound for s in report.soft_routing)


def test_pinning_the_routing_to_fp32_is_what_keeps_the_gates_close(exported):
    """The same BF16 graph with the router and routing math in BF16 too: its gates move further."""
    _, pinned = exported("vmoe-tiny", precision="bf16", capacity_factor=0.5, batch_priority=True)
    _, reduced = exported("vmoe-tiny", precision="bf16", routing_precision="reduced", capacity_factor=0.5,
                          batch_priority=True)  # fmt: skip
    first, second = validate(pinned.path, batch=32), validate(reduced.path, batch=32)
    assert second.routing_precision == "reduced"
    assert second.routing[0].gate_error > first.routing[0].gate_error
