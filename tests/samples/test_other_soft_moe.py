"""samples/03_other_soft_moe: two Soft-MoE layers written by other people's conventions, inside a small
ViT loaded with --module, are found, rewritten into plugins and validated, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "spec, experts, moe_layers",
    [
        ("rmsnorm_soft_moe.py:build", 4, ["blocks.2.mlp", "blocks.3.mlp"]),
        ("paper_soft_moe.py:build", 8, ["blocks.1.mlp", "blocks.3.mlp"]),
    ],
)
def test_other_soft_moe_layers_rewrite_and_validate(tmp_path, monkeypatch, spec, experts, moe_layers):
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    graph, plugins = tmp_path / "m.onnx", tmp_path / "m.plugins.onnx"
    module = f"samples/03_other_soft_moe/{spec}"
    result = runner.invoke(main, ["export", "--module", module, "--input-shape", "2,3,32,32", "-o", str(graph)])
    assert result.exit_code == 0, result.output

    report = tmp_path / "rewrite.json"
    result = runner.invoke(main, ["rewrite", str(graph), "-o", str(plugins), "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["counts"] == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}
    assert [layer["layer"] for layer in data["layers"]] == moe_layers
    for layer in data["layers"]:
        assert [p["plugin"] for p in layer["plugins"]] == ["SoftRoute", "SoftDispatch", "SoftCombine"]
        assert layer["plugins"][1]["attrs"]["num_experts"] == experts
    ops = {n.op_type for n in onnx.load(str(plugins)).graph.node}
    assert {"SoftRoute", "SoftDispatch", "SoftCombine"} <= ops
    # the slot and token mixes are gone; only the logits einsum is left of the layer's einsums
    assert sum(n.op_type == "Einsum" for n in onnx.load(str(plugins)).graph.node) == 2

    result = runner.invoke(main, ["validate", str(plugins), "--batch", "3", "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"]
