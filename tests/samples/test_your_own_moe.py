"""samples/04_your_own_moe: MoE layers other people wrote (five packages, two hand-written styles, k = 1
and 2 where the package has both, capacities that drop tokens), each inside a small ViT loaded with
--module: exported with a dynamic batch and checked against the package's own forward pass at two
batches, every MoE layer rewritten into plugins with the semantics found by value, the plugin graph
validated with every routing decision equal, and a bundle built. The README's commands run as written."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from exporter.deploy.bundle import build_bundle
from exporter.export.export import export_onnx
from exporter.parity.validate import validate_onnx
from exporter.rewrite.rewrite import rewrite_onnx
from exporter.sources.loading import from_module, load
from plugins.topk_route.capacity import capacity

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "04_your_own_moe"
SHAPE = (2, 3, 32, 32)
PACKAGES = {
    "lucidrains_moe": "mixture_of_experts",
    "st_moe": "st_moe_pytorch",
    "deepspeed_moe": "deepspeed",
    "bwconrad_soft_moe": "soft_moe",
    "lucidrains_soft_moe": "soft_moe_pytorch",
}

# file:factory -> (family, TopKRoute attributes that must hold, the package's own capacity for T tokens of the
# batch (a rule that follows the batch) or None, whether tokens drop, what export says it did)
CASES = {
    "lucidrains_moe.py:build": ("vmoe", dict(k=2, capacity=20, normalize=1), None, True, ["substituted safe_one_hot"]),
    "st_moe.py:build": (
        "vmoe",
        dict(k=2, capacity=20, normalize=2),
        None,
        True,
        ["substituted safe_one_hot", "draws uniform_ in eval", "replaced by its mean"],
    ),
    "deepspeed_moe.py:top1": (
        "vmoe",
        dict(k=1, capacity=0, normalize=0),
        lambda t: max(math.ceil(t / 4 * 4.0), 4),
        False,
        ["DeepSpeed TopKGate's capacity"],
    ),
    "deepspeed_moe.py:top2": (
        "vmoe",
        dict(k=2, capacity=0, normalize=3),
        lambda t: max(math.ceil(t / 4 * 0.5 * 2), 4),
        True,
        ["DeepSpeed TopKGate's capacity"],
    ),
    "bwconrad_soft_moe.py:build": ("soft_moe", {}, None, False, []),
    "lucidrains_soft_moe.py:build": ("soft_moe", {}, None, False, []),
    "cumsum_moe.py:top1": ("vmoe", dict(k=1, capacity=12, by_token=0), None, True, []),
    "cumsum_moe.py:top2": ("vmoe", dict(k=2, capacity=24, by_token=0), None, True, []),
    "loop_moe.py:top1": ("vmoe", dict(k=1, capacity=0, by_token=0), lambda t: int(0.75 * t * 1 / 4), True, []),
    "loop_moe.py:top2": ("vmoe", dict(k=2, capacity=0, by_token=1), lambda t: int(0.75 * t * 2 / 4), True, []),
}


def _needs(spec: str) -> None:
    package = PACKAGES.get(spec.split(".py")[0])
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (the test extra installs it)")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Each case exported and rewritten once: ``pipeline(spec) -> (source, export, rewrite)``."""
    done = {}

    def run(spec: str):
        if spec not in done:
            folder = tmp_path_factory.mktemp(spec.replace(".py:", "_"))
            source = from_module(f"{SAMPLE / spec}", input_shape=SHAPE)
            exported = export_onnx(load(source), folder / "model.onnx", routing_outputs=True, example_batch=2)
            rewritten = rewrite_onnx(folder / "model.onnx", folder / "model.plugins.onnx")
            done[spec] = (source, exported, rewritten)
        return done[spec]

    return run


@pytest.mark.parametrize("spec", list(CASES))
def test_export_is_dynamic_and_checked_against_the_package_at_two_batches(pipeline, spec):
    _needs(spec)
    source, exported, _ = pipeline(spec)
    *_, said = CASES[spec]
    assert exported.dynamic_batch and sorted(exported.checked) == [1, 2]
    assert all(err < 1e-4 for err in exported.checked.values())
    for words in said:
        assert any(words in note for note in exported.notes), (words, exported.notes)
    for batch in (2, 3):  # the package's own forward pass, at the traced batch and another
        report = validate_onnx(exported.path, source, batch=batch)
        assert report.passed, report.to_dict()


@pytest.mark.parametrize("spec", list(CASES))
def test_every_moe_layer_is_rewritten_and_its_routing_matches(pipeline, spec):
    _needs(spec)
    source, _, rewritten = pipeline(spec)
    family, attrs, package_capacity, drops, _ = CASES[spec]
    assert not rewritten.declined and len(rewritten.layers) == 2
    assert {layer.family for layer in rewritten.layers} == {family}
    for layer in rewritten.layers:
        route = layer.nodes[0]
        assert route.plugin == ("TopKRoute" if family == "vmoe" else "SoftRoute")
        assert {k: route.attrs[k] for k in attrs} == attrs, (layer.layer, route.attrs)
        if package_capacity:  # the rule found gives the package's capacity at every batch up to 64 images
            assert [capacity(64 * b, route.attrs) for b in range(1, 65)] == [
                package_capacity(64 * b) for b in range(1, 65)
            ]
    for batch in (2, 3):
        report = validate_onnx(rewritten.path, source, batch=batch)
        assert report.passed, report.to_dict()
        if family == "vmoe":  # every decision of every layer: expert, kept, buffer slot
            assert report.routing_status == "checked" and len(report.routing) == 2
            assert all(r.agreement == 1.0 for r in report.routing)
            assert any(r.dropped_expected > 0 for r in report.routing) == drops


@pytest.mark.parametrize("spec", list(CASES))
def test_a_bundle_is_built_from_the_same_graphs(pipeline, spec, tmp_path):
    _needs(spec)
    source, exported, rewritten = pipeline(spec)
    bundle = build_bundle(source, tmp_path / "b", targets=[89], graphs=(exported, rewritten), batch=2)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    kinds = ("TopK", "Soft")[CASES[spec][0] == "soft_moe"]
    assert manifest["plugins"]["nodes"] == {f"{kinds}{p}": 2 for p in ("Route", "Dispatch", "Combine")}
    assert bundle.passed and not bundle.declined
    assert (tmp_path / "b" / "ptx").is_dir()


def test_the_readme_commands(sample_run):
    """The README's commands for one package, end to end through the CLI."""
    _needs("lucidrains_moe.py:build")
    run = sample_run("04_your_own_moe")
    assert run.commands, "the README shows no commands"
    for command in run.commands:
        run(command)
    plan = json.loads(run.path("rewrite.json").read_text())
    assert plan["counts"] == {"TopKRoute": 2, "TopKDispatch": 2, "TopKCombine": 2}
