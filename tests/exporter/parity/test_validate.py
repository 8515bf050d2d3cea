"""validate(target): what `moe-export validate` runs, called as a library function, for an ONNX
graph, an engine file and a bundle (the TensorRT runs themselves are GPU-marked elsewhere)."""

from __future__ import annotations

import json
import shutil

import pytest

from exporter import settings
from exporter.backends.tensorrt import TensorRTUnavailable, tensorrt_available
from exporter.errors import UserError
from exporter.parity.validate import validate
from exporter.sources.choice import ModelChoice

NO_TENSORRT = tensorrt_available() is not None


def test_an_onnx_graph_against_the_model_it_records(exported):
    source, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    report = validate(result.path)
    assert report.passed and report.model == "vmoe-tiny" and report.backend == "onnxruntime-cpu"
    assert report.tolerances == {"rtol": settings.TOLERANCES["fp32"].rtol, "routing_agreement": 1.0}
    assert [r.decisions for r in report.routing] == [1.0, 1.0]


def test_choice_overrides_the_recorded_model_and_fails_honestly(exported):
    _, result = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    other = validate(result.path, ModelChoice(capacity_factor=4.0))  # PyTorch now keeps every token
    assert not other.passed and any(r.dropped_expected == 0 < r.dropped_actual for r in other.routing)
    assert validate(result.path, ModelChoice(seed=1)).passed is False  # other random weights


def test_tolerance_overrides_replace_only_what_is_given(exported):
    _, result = exported("soft-moe-tiny")
    strict = validate(result.path, rtol=0.0)
    assert strict.tolerances == {"rtol": 0.0, "routing_agreement": 1.0}
    assert strict.passed == all(o.max_abs == 0 for o in strict.outputs)


def test_onnx_option_is_for_engines(exported):
    _, result = exported("soft-moe-tiny")
    with pytest.raises(UserError, match="--onnx applies to engine files"):
        validate(result.path, engine_graph=result.path)


def test_a_bundle_without_an_engine_says_how_to_build_one(bundled, tmp_path):
    _, _, folder = bundled("soft-moe-tiny")
    with pytest.raises(UserError, match="has no engine yet: build it with `moe-export build engine"):
        validate(folder)


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
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorRTUnavailable, match="validating an engine needs TensorRT"):
        validate(bundle)
    alone = tmp_path / "alone.engine"  # no manifest beside it: the graph must be named
    alone.write_bytes(b"x")
    with pytest.raises(UserError, match="give --onnx GRAPH"):
        validate(alone)
