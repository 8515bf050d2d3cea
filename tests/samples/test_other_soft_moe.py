"""samples/03_other_soft_moe: two Soft-MoE layers written by other people's conventions, inside a small
ViT loaded with --module, are found, rewritten into plugins and validated: the README's commands,
extracted from it, through the CLI."""

from __future__ import annotations

import json

import onnx
import pytest


@pytest.mark.parametrize(
    "index, experts, moe_layers",
    [
        (0, 4, ["blocks.2.mlp", "blocks.3.mlp"]),  # rmsnorm_soft_moe.py
        (1, 8, ["blocks.1.mlp", "blocks.3.mlp"]),  # paper_soft_moe.py
    ],
)
def test_the_readme_commands_rewrite_and_validate(sample_run, index, experts, moe_layers):
    run = sample_run("03_other_soft_moe")
    export, rewrite, validate = run.commands[3 * index : 3 * index + 3]
    assert [export[0], rewrite[0], validate[0]] == ["export", "rewrite", "validate"]
    run(export)
    run([*rewrite, "--json", "rewrite.json"])
    data = json.loads(run.path("rewrite.json").read_text())
    assert data["counts"] == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}
    assert [layer["layer"] for layer in data["layers"]] == moe_layers
    for layer in data["layers"]:
        assert [p["plugin"] for p in layer["plugins"]] == ["SoftRoute", "SoftDispatch", "SoftCombine"]
        assert layer["plugins"][1]["attrs"]["num_experts"] == experts
    plugins = onnx.load(str(run.path(run.option(rewrite, "-o"))))
    assert {"SoftRoute", "SoftDispatch", "SoftCombine"} <= {n.op_type for n in plugins.graph.node}
    # the slot and token mixes are gone; only the logits einsum is left of the layer's einsums
    assert sum(n.op_type == "Einsum" for n in plugins.graph.node) == 2

    run([*validate, "--json", "v.json"])
    assert json.loads(run.path("v.json").read_text())["passed"]
