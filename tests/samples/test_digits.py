"""samples/02_digits: the shipped weights are small, reach the accuracy recorded in metrics.json when
loaded back, and go through `moe-export export` and `validate` like any checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from exporter.digits import accuracy, load_split, predict
from exporter.source import from_zoo, load

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "02_digits"
MODELS = {"vmoe-tiny": "vmoe_digits.safetensors", "soft-moe-tiny": "soft_moe_digits.safetensors"}


@pytest.mark.parametrize("name", MODELS)
def test_shipped_weights_reach_the_recorded_accuracy(name):
    recorded = json.loads((SAMPLE / "metrics.json").read_text())[name]
    path = SAMPLE / MODELS[name]
    assert recorded["checkpoint"] == MODELS[name]
    assert path.stat().st_size == recorded["file_bytes"] < 1_000_000
    loaded = load(from_zoo(name, checkpoint=str(path)))
    split = load_split(loaded.source.input_shape)
    assert len(split.test_images) == recorded["test_images"] == 448
    measured = accuracy(predict(loaded.module, split.test_images, 64), split.test_labels)
    assert round(measured, 4) == recorded["test_accuracy"]
    assert measured > 0.9


@pytest.mark.parametrize("name", MODELS)
def test_shipped_weights_export_and_validate(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's commands are relative to the repository
    graph = tmp_path / f"{name}.onnx"
    runner = CliRunner()
    checkpoint = f"samples/02_digits/{MODELS[name]}"
    result = runner.invoke(
        main, ["export", "--model", name, "--checkpoint", checkpoint, "--routing-outputs", "-o", str(graph)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["validate", str(graph), "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["model"] == name
