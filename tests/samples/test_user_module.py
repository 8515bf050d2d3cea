"""samples/01_user_module: the README's two commands (extracted from it), export then validate, through
the CLI; and a user module with two outputs and grouped routing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.helpers import run

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_commands_export_and_validate(sample_run):
    run = sample_run("01_user_module")
    export, validate = run.commands
    result = run(export)
    assert "routing.blocks.1.mlp.kept" in result.output
    assert os.path.getsize(run.path(run.option(export, "-o"))) > 10_000
    run([*validate, "--json", "report.json"])
    data = json.loads(run.path("report.json").read_text())
    assert data["passed"] and data["model"] == run.option(export, "--module")
    (layer,) = data["routing"]
    assert layer["layer"] == "blocks.1.mlp" and layer["agreement"] == 1.0 and layer["dropped_expected"] > 0


def test_user_module_with_two_outputs_and_grouped_routing(tmp_path):
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "user_modules.py"
    graph = tmp_path / "u.onnx"
    result = run(
        "export",
        "--module",
        f"{fixture}:tiny_vmoe_user_model",
        "--input-shape",
        "4,3,16,16",
        "--routing-outputs",
        "-o",
        graph,
    )
    assert result.exit_code == 0, result.output
    assert "2*groups" in result.output and "output_1" in result.output
    result = run("validate", graph, "--trust-module", "--batch", "6", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert [o["name"] for o in data["outputs"]] == ["output_0", "output_1"] and data["passed"]
