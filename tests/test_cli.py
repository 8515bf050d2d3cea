"""The CLI: help with examples, the zoo listing, JSON reports, and one clear line with exit code 2 for
every bad input (exit 1 when parity fails)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.sources.zoo import ZOO
from tests.helpers import assert_one_line_error, run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "user_modules.py"


@pytest.mark.parametrize("command", ["models", "export", "validate", "rewrite", "demo", "bench"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_models_lists_one_zoo_model_at_the_start_of_each_line():
    lines = run("models").output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(ZOO)
    assert all(ZOO[line.split()[0]].family in line for line in lines)
    listed = json.loads(run("models", "--json", "-").output)
    assert {m["name"]: m["params"] for m in listed}["vmoe-b16-every2-e32"] == 978_974_835


def test_export_then_validate_with_json_report(tmp_path):
    graph, report = tmp_path / "v.onnx", tmp_path / "report.json"
    args = ["--model", "vmoe-tiny", "--k", "1", "--capacity-factor", "0.5", "--batch-priority", "--group-images", "2"]
    result = run("export", *args, "--routing-outputs", "-o", graph, "--json", tmp_path / "export.json")
    assert result.exit_code == 0, result.output
    assert "portable" in result.output and "2*groups" in result.output
    assert json.loads((tmp_path / "export.json").read_text())["routing_layers"] == ["blocks.1.mlp", "blocks.3.mlp"]
    result = run("validate", graph, "--batch", 4, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["passed"] and data["batch"] == 4 and len(data["routing"]) == 2
    row = next(line for line in result.output.splitlines() if line.startswith("blocks.1.mlp"))
    assert row.split()[2:6] == ["100%"] * 4 and row.split()[6] == "0"  # expert, kept, slot, all; no slot swaps


def test_validate_exits_1_when_parity_fails(tmp_path):
    graph = tmp_path / "v.onnx"
    assert run("export", "--model", "vmoe-tiny", "--routing-outputs", "-o", graph).exit_code == 0
    model = onnx.load(str(graph))
    for init in model.graph.initializer:
        if init.name == "head.weight" or init.name == "head.weight.T":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(model, str(graph))
    result = run("validate", graph, "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "Traceback" not in result.output
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


def test_unknown_model(tmp_path):
    assert_one_line_error(run("export", "--model", "vmoe-huge", "-o", tmp_path / "x.onnx"), "unknown model 'vmoe-huge'")


def test_missing_onnx():
    assert_one_line_error(run("validate", "nowhere.onnx"), "does not exist")


def test_corrupt_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not really a protobuf\xff\xff")
    assert_one_line_error(run("validate", bad, "--model", "vmoe-tiny"), "not a readable ONNX model")


def test_truncated_onnx(tmp_path, exported):
    _, result = exported("soft-moe-tiny")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(result.path.read_bytes()[:5000])
    assert_one_line_error(run("validate", cut, "--model", "soft-moe-tiny"), "not a readable ONNX model")


def test_factory_that_does_not_return_a_module(tmp_path):
    result = run(
        "export", "--module", f"{FIXTURES}:not_a_module", "--input-shape", "1,3,16,16", "-o", tmp_path / "x.onnx"
    )
    assert_one_line_error(result, "not a torch.nn.Module")


def test_zoo_input_shape_mismatch(tmp_path):
    result = run("export", "--model", "vmoe-tiny", "--input-shape", "8,3,64,64", "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "does not match vmoe-tiny")


def test_user_module_input_shape_mismatch(tmp_path):
    result = run("export", "--module", f"{FIXTURES}:plain_cnn", "--input-shape", "2,1,16,16", "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "does not run on input 2x1x16x16")


def test_inputs_npz_shape_mismatch(tmp_path, exported):
    _, result = exported("soft-moe-tiny")
    npz = tmp_path / "in.npz"
    np.savez(npz, images=np.zeros((2, 3, 16, 16), np.float32))
    assert_one_line_error(run("validate", result.path, "--inputs", npz), "does not match the graph's images")


def test_batch_not_a_multiple_of_the_group(exported):
    _, result = exported("vmoe-tiny")
    assert_one_line_error(run("validate", result.path, "--batch", 5), "not a multiple of the routing group (8 images)")


def test_k_larger_than_experts(tmp_path):
    result = run("export", "--model", "vmoe-tiny", "--k", "5", "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "k must be between 1 and the number of experts (4)")


def test_routing_options_on_a_soft_moe(tmp_path):
    result = run("export", "--model", "soft-moe-tiny", "--k", "1", "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "only apply to V-MoE")


def test_model_and_module_together(tmp_path):
    result = run("export", "--model", "vmoe-tiny", "--module", f"{FIXTURES}:plain_cnn", "-o", tmp_path / "x.onnx")
    assert_one_line_error(result, "not both")


def test_usage_errors_exit_2():
    assert run("export", "--model", "vmoe-tiny").exit_code == 2  # missing -o
    assert run("export", "--bogus").exit_code == 2


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "export", "--model", "nope", "-o", str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown model 'nope'; `moe-export models` lists the zoo"
    assert not (tmp_path / "x.onnx").exists()


# --- inspect routing, sweep capacity -----------------------------------------------------------------

DIGITS_VMOE = Path(__file__).resolve().parents[1] / "samples" / "02_digits" / "vmoe_digits.safetensors"


@pytest.mark.parametrize(
    "command", [["inspect", "routing"], ["sweep", "capacity"], ["build", "bundle"], ["build", "engine"]]
)
def test_routing_commands_have_help_with_an_example(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Example" in result.output


def test_inspect_routing_writes_the_picture_and_json(tmp_path):
    dest, report = tmp_path / "r.png", tmp_path / "r.json"
    result = run(
        "inspect",
        "routing",
        "--model",
        "vmoe-tiny",
        "--checkpoint",
        DIGITS_VMOE,
        "--sample",
        1,
        "--capacity-factors",
        "0.5,2",
        "-o",
        dest,
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["layout"]["rows"] == 2 and data["layout"]["cols"] == 5 and dest.is_file()  # the input + 2 x 2
    assert "blocks.3.mlp" in result.output and "C=0.5 BPR" in result.output


def test_inspect_routing_bad_inputs(tmp_path):
    out = tmp_path / "r.png"
    assert_one_line_error(
        run("inspect", "routing", "--model", "vmoe-tiny", "--image", tmp_path / "no.png", "-o", out),
        "no.png does not exist",
    )
    assert_one_line_error(
        run("inspect", "routing", "--model", "vmoe-tiny", "--capacity-factors", "half,1", "-o", out),
        "--capacity-factors",
    )
    assert_one_line_error(
        run("inspect", "routing", "--model", "vmoe-tiny", "--image", out, "--sample", 1, "-o", out), "not both"
    )
    assert_one_line_error(run("inspect", "routing", "--onnx", tmp_path / "no.onnx", "-o", out), "does not exist")
    assert not out.exists()


def test_sweep_capacity_bad_inputs(tmp_path):
    soft = run("sweep", "capacity", "--model", "soft-moe-tiny", "--no-parity")
    assert_one_line_error(soft, "needs a V-MoE or Swin-MoE model")
    bad_option = run("sweep", "capacity", "--model", "vmoe-tiny", "--capacity-factor", "0.5")
    assert_one_line_error(bad_option, "No such option '--capacity-factor'", "--factors")
    zero = run("sweep", "capacity", "--model", "vmoe-tiny", "--factors", "0,1")
    assert_one_line_error(zero, "--factors takes finite numbers above 0, not 0")


def test_sweep_capacity_table_plot_and_json(tmp_path):
    plot, report = tmp_path / "s.png", tmp_path / "s.json"
    result = run(
        "sweep",
        "capacity",
        "--model",
        "vmoe-tiny",
        "--checkpoint",
        DIGITS_VMOE,
        "--factors",
        "2",
        "--no-parity",
        "-o",
        plot,
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [(p["capacity_factor"], p["batch_priority"]) for p in data["points"]] == [(2.0, False), (2.0, True)]
    assert [p["dropped"] for p in data["points"]] == [0.0, 0.0]  # C = E / k: unlimited capacity
    assert plot.is_file() and "vanilla" in result.output and "BPR" in result.output


def test_rewrite_plan_only_table_and_bad_inputs(tmp_path):
    graph = tmp_path / "s.onnx"
    assert run("export", "--model", "soft-moe-tiny", "-o", graph).exit_code == 0
    result = run("rewrite", graph, "--plan-only")
    assert result.exit_code == 0, result.output
    assert "blocks.3.mlp" in result.output and "planned" in result.output and "nothing written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]
    plan = json.loads(run("rewrite", graph, "--plan-only", "--json", "-").stdout)
    assert plan["path"] is None and plan["counts"] == {"SoftRoute": 2, "SoftDispatch": 2, "SoftCombine": 2}

    assert_one_line_error(run("rewrite", graph), "-o", "--plan-only")
    assert_one_line_error(run("rewrite", tmp_path / "missing.onnx", "-o", tmp_path / "x.onnx"), "does not exist")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert_one_line_error(run("rewrite", tmp_path / "junk.onnx", "-o", tmp_path / "x.onnx"), "not a readable ONNX")
    out = tmp_path / "p.onnx"
    assert run("rewrite", graph, "-o", out).exit_code == 0
    assert_one_line_error(run("rewrite", out, "-o", tmp_path / "again.onnx"), "already holds moe:: plugin nodes")


def test_bench_prints_its_table_on_cpu():
    args = ["--model", "soft-moe-tiny", "--batch", 2, "--runs", 3, "--warmup", 1]
    result = run("bench", *args, "--backends", "torch-eager,onnxruntime-cpu,tensorrt")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("soft-moe-tiny, batch 2, 1 warm-up + 3 timed runs") and "threads" in lines[0]
    assert lines[1].split()[:4] == ["backend", "device", "batch", "median"] and "max rel err" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == ["torch-eager", "onnxruntime-cpu", "tensorrt"]
    for backend in ("torch-eager", "onnxruntime-cpu"):
        cells = rows[backend]
        assert cells[1:3] == ["cpu", "2"] and float(cells[3]) <= float(cells[4]) and float(cells[7]) < 1e-4
    assert "skipped:" in " ".join(rows["tensorrt"]) or float(rows["tensorrt"][3]) > 0


def test_bench_json_to_stdout_and_bad_inputs():
    tiny = ["--model", "vmoe-tiny"]
    result = run("bench", *tiny, "--backends", "torch-eager", "--runs", 2, "--warmup", 0, "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "vmoe-tiny" and data["batch"] == 8 and data["runs"] == 2
    assert [r["backend"] for r in data["rows"]] == ["torch-eager"] and data["rows"][0]["status"] == "ok"

    assert_one_line_error(run("bench", *tiny, "--backends", "torch-eager,tensorrt-fp8"), "unknown backend")
    assert_one_line_error(run("bench", *tiny, "--batch", 3), "multiple of the routing group")
    assert_one_line_error(run("bench", "--model", "vmoe-huge"), "unknown model 'vmoe-huge'")


def test_build_bundle_then_engine_without_tensorrt(tmp_path):
    """The CPU stages run and keep their bundle; the TensorRT stage is one line and exit code 2."""
    from exporter.backends.tensorrt import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built (tests/exporter/test_engine.py)")
    bundle = tmp_path / "b"
    result = run(
        "build", "engine", "--model", "vmoe-tiny", "--target", "sm_90", "-o", bundle, "--triton-repo", tmp_path / "r"
    )
    assert_one_line_error(result, "TensorRT", "install", f"The bundle in {bundle} is complete")
    assert "routing decisions 100%" in result.stdout and "moe-export build engine" in result.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["engine"] is None and set(manifest["files"]) >= {"model.onnx", "model.plugins.onnx", "inputs.npz"}
    assert not (tmp_path / "r").exists()
    assert_one_line_error(run("build", "engine", bundle), "TensorRT", "is complete")
    assert_one_line_error(run("validate", bundle), "has no engine yet", "moe-export build engine")
    data = json.loads(run("build", "bundle", "--model", "soft-moe-tiny", "--target", "sm_87", "-o", tmp_path / "s",
                          "--json", "-").stdout)  # fmt: skip
    assert data["passed"] and data["targets"] == ["sm_87"] and data["plugins"]["SoftRoute"] == 2


def test_build_bundle_failing_parity_prints_the_table_and_its_worst_line(tmp_path, monkeypatch):
    """A real mismatch (a tolerance no float32 run meets): the tables that failed, then one line saying why."""
    from exporter import settings

    monkeypatch.setitem(settings.TOLERANCES, "fp32", settings.Tolerances(rtol=1e-12, routing_agreement=1.0))
    result = run("build", "bundle", "--model", "soft-moe-tiny", "-o", tmp_path / "b")
    assert result.exit_code == 1 and not (tmp_path / "b").exists()
    assert result.stdout.count("rel tol 1e-12") == 2 and "FAIL" in result.stdout  # both graphs' tables
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("FAILED:")]
    assert "model.onnx: logits max rel err" in line and "(tolerance 1e-12)" in line and "no bundle written" in line


def test_demo_shows_what_it_does_first_and_names_a_routing_picture_per_model_last(tmp_path, monkeypatch):
    """The demo on one V-MoE (the real command, its runs cut to one model to keep the suite short)."""
    import functools

    import exporter.tools.demo as demo_module

    one = (("vmoe-tiny", {"capacity_factor": 0.5, "batch_priority": True}),)
    monkeypatch.setattr(demo_module, "demo", functools.partial(demo_module.demo, runs=one))
    result = run("demo", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("... Loading PyTorch, ONNX and ONNX Runtime")  # before the imports
    picture = tmp_path / "vmoe-tiny.routing.png"
    assert result.stdout.splitlines()[-2:] == [
        f"routing picture of vmoe-tiny: {picture}",
        f"all passed; graphs, reports, bundles and pictures in {tmp_path}",
    ]
    assert picture.stat().st_size > 10_000 and (tmp_path / "vmoe-tiny.bundle" / "manifest.json").is_file()
    assert "the image repeated, the first copy pictured" in result.stdout  # the graph's groups of 8 images


def test_build_engine_batch_help_names_defaults_that_end():
    """No circle (--opt-batch defaulting to the max batch and --max-batch to the opt batch): each falls
    back to the other only when it is given, else to the bundle's sample batch or one routing group."""
    text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(run("build", "engine", "--help").output.split()))  # unwrap
    for option, other in (("--opt-batch", "--max-batch"), ("--max-batch", "--opt-batch")):
        help_text = text.split(f"{option} INTEGER RANGE")[1].split("[x>=1]")[0]
        assert f"Default: {other} if given, else the bundle's sample batch" in help_text, help_text
        assert "one routing group" in help_text
    shape = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(run("validate", "--help").output.split()))
    assert "N: the images export traces with (recorded in the graph: validate runs that batch too)" in shape
    assert "--batch INTEGER RANGE Images per run (a multiple of the routing group). Default: the N of the " in shape


def test_build_and_validate_bad_inputs(tmp_path):
    assert_one_line_error(run("build", "engine", "--model", "vmoe-tiny"), "-o DIR")
    assert_one_line_error(run("build", "engine"), "give a bundle folder")
    assert_one_line_error(run("build", "engine", "--min-batch", 16, "--max-batch", 8, "-o", tmp_path / "x",
                              "--model", "vmoe-tiny"), "min batch <= opt batch <= max batch")  # fmt: skip
    (tmp_path / "notes.txt").write_text("x")
    assert_one_line_error(run("build", "engine", tmp_path / "notes.txt", "-o", tmp_path / "e"), "neither a moe-export")
    assert_one_line_error(run("build", "bundle", "--model", "soft-moe-tiny", "-o", tmp_path), "not a moe-export bundle")
    assert_one_line_error(
        run("build", "bundle", "--model", "soft-moe-tiny", "--target", "sm_x", "-o", tmp_path / "b"), "sm_x"
    )
    (tmp_path / "m.engine").write_bytes(b"")
    assert_one_line_error(run("validate", tmp_path / "m.engine"), "give --onnx GRAPH")
    assert_one_line_error(run("validate", tmp_path), "not a moe-export bundle")


def test_a_command_whose_module_cannot_import_says_why_and_the_rest_work(monkeypatch):
    import cli

    monkeypatch.setitem(cli.COMMANDS, "broken", "exporter.commands.no_such_module:command")
    listing = run("--help")
    assert listing.exit_code == 0 and "broken" in listing.output and "unavailable" in listing.output
    assert_one_line_error(run("broken"), "`moe-export broken` is unavailable", "ModuleNotFoundError")
    assert run("models", "--json", "-").exit_code == 0


def test_commands_are_listed_in_pipeline_order():
    listing = run("--help").output
    order = [listing.index(f"  {name} ") for name in ("models", "import", "export", "rewrite", "validate", "build")]
    assert order == sorted(order)


def test_reduced_precision_routing_table_says_what_it_judges(exported):
    """BF16: slot agreement is far below the decisions' (flips cascade through the buffers) beside
    "pass"; a note under the table says which columns are judged and why slots are not."""
    note = "pass/FAIL judges each pair's decisions, its expert and kept/dropped together: at least 98.00%"
    _, bf16 = exported("vmoe-tiny", precision="bf16", capacity_factor=0.5, batch_priority=True)
    result = run("validate", bf16.path, "--batch", 32)
    assert result.exit_code == 0, result.output
    assert note in result.output and "slot and all are shown, not judged" in result.output
    _, fp32 = exported("vmoe-tiny", capacity_factor=0.5, batch_priority=True)
    assert "not judged" not in run("validate", fp32.path).output  # every decision agrees: nothing to explain


def test_export_in_fp16_reports_its_casts_and_validates(tmp_path):
    out = tmp_path / "h.onnx"
    result = run("export", "--model", "soft-moe-tiny", "--precision", "fp16", "-o", out, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == "fp16" and report["routing_precision"] == "fp32"
    assert report["casts"] == 8 and report["fp32_nodes"]["routing"] > 0 and report["size_bytes"] > 0
    table = run("validate", out)
    assert table.exit_code == 0, table.output
    assert "fp16 (routing in FP32)" in table.output and "Soft-MoE weights per layer" in table.output
