"""Reduced precision and the routing: FP16 and BF16 graphs of V-MoE S/32 and the two trained digits
models, with the routing pinned to FP32 and with it in the reduced type too, validated on CPU against
the FP32 PyTorch model. Prints markdown tables for the README.

    python benchmarks/precision.py               # digits models and V-MoE S/32 (about 6 minutes)
    python benchmarks/precision.py --digits      # the digits models only (about a minute)

Per graph: its size and Cast nodes, the float nodes kept in FP32, the largest output error relative to
the output's scale, the smallest share of (token, choice) decisions that agree in any V-MoE layer, the
flipped decisions (all layers; each explained by its gate margin unless counted as unexplained), the
largest gate deviation, and for the digits models the test accuracy over the 448 test images (FP32
PyTorch: the first row). FP16 with the routing in FP32 runs in ONNX Runtime (its CPU provider computes
ops that lack FP16 kernels in FP32), and again emulated (every FP16 tensor rounded where it is made, as
BF16 always runs here: exporter.backends.emulation): the two bracket what a GPU does. FP16 with the
routing in FP16 runs emulated only (``emulation_type``: ONNX Runtime's routing would read unrounded
gates), so compare it with the emulated pinned row.

S/32 runs on 16 seeded random images (2 routing groups of 8, 1600 tokens a layer); its weights are the
zoo's seeded random ones. The S/32 rows also measure the two choices ``export --precision`` makes:
LayerNorm and the residual stream in the reduced type (against keeping them in FP32).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402

from exporter import settings  # noqa: E402
from exporter.backends.emulation import emulated  # noqa: E402
from exporter.export.export import export_onnx  # noqa: E402
from exporter.export.precision import reduce_precision  # noqa: E402
from exporter.formats.graph import PRECISION_KEY, module_path, read_header, vmoe_layers  # noqa: E402
from exporter.formats.graph import precision as graph_precision  # noqa: E402
from exporter.parity.parity import (  # noqa: E402
    compare_to_reference,
    onnxruntime_outputs,
    ort_backend_name,
    reference_run,
)
from exporter.sources.digits import load_split  # noqa: E402
from exporter.sources.loading import from_zoo, load  # noqa: E402

DIGITS = ROOT / "samples" / "02_digits"
MODELS = {
    "vmoe-tiny digits": ("vmoe-tiny", DIGITS / "vmoe_digits.safetensors"),
    "soft-moe-tiny digits": ("soft-moe-tiny", DIGITS / "soft_moe_digits.safetensors"),
    "V-MoE S/32 (vmoe-s32-last2-e8)": ("vmoe-s32-last2-e8", None),
}
VARIANTS = [  # (row label, precision, routing precision)
    ("fp16, routing FP32", "fp16", "fp32"),
    ("fp16, routing FP32 (emulated)", "fp16", "emulated"),
    ("fp16, routing fp16 too (emulated)", "fp16", "reduced"),
    ("bf16, routing FP32", "bf16", "fp32"),
    ("bf16, routing bf16 too", "bf16", "reduced"),
]
BLOCK = re.compile(r"(^|\.)blocks\.\d+$")


def keep_layernorm(node) -> bool:
    return node.op_type == "LayerNormalization"


def keep_layernorm_and_residual(node) -> bool:
    """LayerNorm, and the residual Adds (in an encoder block's own scope, ``x = x + f(x)``)."""
    path = module_path(node.metadata_props.get("namespace", ""))
    return keep_layernorm(node) or (node.op_type == "Add" and bool(path) and bool(BLOCK.search(path[-1])))


def converted(fp32: Path, dest: Path, precision: str, keep) -> tuple[Path, int, int]:
    """The FP32 graph converted by the library pass with more nodes kept in FP32 (a saved graph, not the
    in-memory export: the pass works on either)."""
    model = ir.load(str(fp32))
    layers = list(vmoe_layers(onnx.load(str(fp32), load_external_data=False)))
    result = reduce_precision(model, precision, vmoe_layers=layers, keep=keep)
    model.metadata_props[PRECISION_KEY] = json.dumps({"precision": precision, "routing": "fp32"})
    ir.save(model, str(dest))
    return dest, result.casts, sum(result.fp32_nodes.values())


def row(label, path, casts, kept, report, labels=None, predictions=None) -> dict:
    flips = sum(r.flip_count for r in report.routing)
    unexplained = sum(r.unexplained for r in report.routing)
    gate = max((r.gate_error for r in report.routing if r.gate_error is not None), default=None)
    soft = max((max(s.dispatch_max_abs, s.combine_max_abs) for s in report.soft_routing), default=None)
    accuracy = None
    if labels is not None and predictions is not None:
        accuracy = float(np.mean(predictions == labels))
    return {
        "variant": label,
        "MiB": sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20,
        "casts": casts,
        "fp32 nodes": kept,
        "max rel err": max(o.max_rel for o in report.outputs),
        "decisions": min((r.decisions for r in report.routing), default=None),
        "flips": flips,
        "unexplained": unexplained,
        "max gate err": gate if gate is not None else soft,
        "accuracy": accuracy,
        "passed": report.passed,
    }


def run_model(name: str, checkpoint: Path | None, work: Path) -> list[dict]:
    source = from_zoo(name, checkpoint=str(checkpoint) if checkpoint else None)
    loaded = load(source)
    inputs, labels, batch = None, None, None
    if checkpoint is not None:  # the digits test split
        split = load_split(source.input_shape)
        inputs = work / f"{name}.inputs.npz"
        np.savez(inputs, images=split.test_images.numpy())
        labels = split.test_labels.numpy()
    else:
        batch = 16
    rows = []
    start = time.perf_counter()
    fp32 = export_onnx(loaded, work / f"{name}.fp32.onnx", routing_outputs=True)
    # PyTorch once per model; each graph then runs once (what validate does, without rerunning PyTorch)
    reference = reference_run(
        source, read_header(fp32.path), batch=batch, inputs_npz=str(inputs) if inputs else None, loaded=loaded
    )
    feeds = {reference.input_name: reference.images}

    def measure(label, path, casts, kept):
        header = read_header(path)
        actual, routers = onnxruntime_outputs(path, header, feeds)
        tolerances = settings.TOLERANCES[graph_precision(header)[0]]
        report = compare_to_reference(
            reference, actual, header, graph=str(path), backend=ort_backend_name(header), tolerances=tolerances,
            routers=routers,
        )  # fmt: skip
        predictions = next(iter(actual.values())).argmax(-1) if labels is not None else None
        rows.append(row(label, path, casts, kept, report, labels, predictions))
        print(f"  {label}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)

    measure("fp32", fp32.path, 0, None)
    for label, precision, routing in VARIANTS:
        if routing == "emulated":
            graph = work / f"{name}.fp16.fp32.onnx"
            copy = emulated(onnx.load(str(graph)), ir.DataType.FLOAT16)
            onnx.save(copy, str(work / f"{name}.fp16.emulated.onnx"))
            measure(label, work / f"{name}.fp16.emulated.onnx", rows[1]["casts"], rows[1]["fp32 nodes"])
            rows[-1]["MiB"] = rows[1]["MiB"]
            continue
        result = export_onnx(
            loaded,
            work / f"{name}.{precision}.{routing}.onnx",
            routing_outputs=True,
            precision=precision,
            routing_precision=routing,
        )
        measure(label, result.path, result.casts, sum(result.fp32_nodes.values()))
    if checkpoint is None:  # what LayerNorm and the residual stream in the reduced type cost
        for precision in ("fp16", "bf16"):
            for label, slug, keep in (
                ("LayerNorm FP32", "ln", keep_layernorm),
                ("LayerNorm + residual FP32", "ln-residual", keep_layernorm_and_residual),
            ):
                dest = work / f"{name}.{precision}.{slug}.onnx"
                path, casts, kept = converted(fp32.path, dest, precision, keep)
                measure(f"{precision}, routing FP32, {label}", path, casts, kept)
    if labels is not None:  # PyTorch's own accuracy on the split
        rows[0]["accuracy"] = float(np.mean(reference.outputs[0].argmax(-1) == labels))
    return rows


def table(title: str, rows: list[dict]) -> str:
    cols = ["variant", "MiB", "casts", "fp32 nodes", "max rel err", "decisions", "flips", "unexplained",
            "max gate err", "accuracy"]  # fmt: skip
    if all(r["accuracy"] is None for r in rows):
        cols.remove("accuracy")
    if all(r["decisions"] is None for r in rows):
        cols = [c for c in cols if c not in ("decisions", "flips", "unexplained")]

    def cell(c, v):
        if v is None:
            return "-"
        if c in ("decisions", "accuracy"):
            return f"{v:.2%}"
        if c == "MiB":
            return f"{v:.2f}"
        if isinstance(v, float):
            return f"{v:.2g}"
        return str(v)

    header = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(cell(c, r[c]) for c in cols) + " |\n" for r in rows)
    return f"**{title}**\n\n{header}{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true", help="the digits models only")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    models = {t: m for t, m in MODELS.items() if not args.digits or m[1] is not None}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for title, (name, checkpoint) in models.items():
            print(f"{title}", file=sys.stderr, flush=True)
            out[title] = run_model(name, checkpoint, Path(tmp))
            print(table(title, out[title]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
