"""samples/02_digits: the shipped weights are small, reach the accuracy recorded in metrics.json when
loaded back, and go through `moe-export export` and `validate` like any checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from exporter.sources.digits import accuracy, load_split, predict
from exporter.sources.loading import from_zoo, load

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


@pytest.mark.parametrize("index", [0, 1])
def test_the_readme_commands_export_and_validate_the_shipped_weights(sample_run, index):
    run = sample_run("02_digits")
    export, validate = run.commands[2 * index : 2 * index + 2]
    assert (export[0], validate[0]) == ("export", "validate")
    run(export)
    run([*validate, "--json", "report.json"])
    report = json.loads(run.path("report.json").read_text())
    assert report["passed"] and report["model"] == run.option(export, "--model")
    assert len(report["routing"]) == (2 if report["model"] == "vmoe-tiny" else 0)


def test_the_readme_commands_draw_the_shipped_pictures(sample_run):
    run = sample_run("02_digits")
    pictures = [c for c in run.commands if c[:2] == ["inspect", "routing"]]
    assert len(pictures) == 2
    for command in pictures:
        png = run.path(run.option(command, "-o"))
        shipped = Image.open(SAMPLE / png.name).size
        png.unlink()  # the copy of the shipped picture: the command writes it again
        run(command)
        assert Image.open(png).size == shipped


def _sweep(run) -> list[str]:
    (command,) = [c for c in run.commands if c[:2] == ["sweep", "capacity"]]
    return command


def test_the_readme_sweep_command_runs(sample_run):
    """The README's sweep on 32 images at one factor (the whole sweep takes minutes: -m slow)."""
    run = sample_run("02_digits")
    command = _sweep(run)
    for name in (run.option(command, "-o"), run.option(command, "--json")):
        run.path(name).unlink()  # the copies of the shipped results: the command writes them again
    run([*command, "--images", "32", "--factors", "0.5"])
    data = json.loads(run.path(run.option(command, "--json")).read_text())
    assert [(p["capacity_factor"], p["batch_priority"]) for p in data["points"]] == [(0.5, False), (0.5, True)]
    assert all(p["parity"]["passed"] for p in data["points"]) and data["images"] == 32
    assert run.path(run.option(command, "-o")).stat().st_size > 10_000  # the plot


@pytest.mark.slow
def test_the_readme_sweep_command_reproduces_the_shipped_results(sample_run):
    run = sample_run("02_digits")
    command = _sweep(run)
    run.path(run.option(command, "--json")).unlink()
    run(command)
    made = json.loads(run.path(run.option(command, "--json")).read_text())
    shipped = json.loads((SAMPLE / "sweep_capacity.json").read_text())
    for ours, theirs in zip(made["points"], shipped["points"], strict=True):
        assert ours["capacity"] == theirs["capacity"] and ours["parity"]["status"] == theirs["parity"]["status"]
        for key in ("dropped", "dropped_gate_mass", "tokens_unrouted", "deviation", "accuracy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
