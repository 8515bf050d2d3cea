"""Graphs exported with --bf16-dispatch against PyTorch, at batch 8 and 32: how far the logits are from
PyTorch's own bfloat16 rounding, how many rounded elements the graph took to the other bfloat16
neighbour of a midpoint, and the error against PyTorch rounding those as the graph did (what validate
judges, with FP32's tolerance; see exporter.compare.RoundingParity).

    python benchmarks/bf16_dispatch.py

Models: vmoe-tiny (seeded, vanilla and BPR), the trained digits V-MoE (samples/02_digits, vanilla and
BPR), the reference checkpoints of tests/fixtures/vmoe (V-MoE vanilla and BPR, Soft-MoE) as
`import vmoe` or `--checkpoint` reads them, and soft-moe-tiny. Each graph is exported once and
validated at each batch in ONNX Runtime (CPU), as `moe-export validate GRAPH --batch N`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.export.export import export_model  # noqa: E402
from exporter.parity.validate import validate_onnx  # noqa: E402
from exporter.sources.loading import from_vmoe_checkpoint, from_zoo  # noqa: E402

DIGITS = str(ROOT / "samples" / "02_digits" / "vmoe_digits.safetensors")
FIXTURES = ROOT / "tests" / "fixtures" / "vmoe"
BATCHES = (8, 32)
CASES = {  # name -> the model, with bf16 dispatch
    "vmoe-tiny vanilla": lambda: from_zoo("vmoe-tiny", bf16_dispatch=True),
    "vmoe-tiny BPR": lambda: from_zoo("vmoe-tiny", batch_priority=True, bf16_dispatch=True),
    "digits V-MoE vanilla": lambda: from_zoo("vmoe-tiny", checkpoint=DIGITS, bf16_dispatch=True),
    "digits V-MoE BPR": lambda: from_zoo("vmoe-tiny", checkpoint=DIGITS, batch_priority=True, bf16_dispatch=True),
    "vmoe_small vanilla": lambda: from_vmoe_checkpoint(str(FIXTURES / "vmoe_small"), bf16_dispatch=True),
    "vmoe_small BPR": lambda: from_vmoe_checkpoint(
        str(FIXTURES / "vmoe_small"), batch_priority=True, bf16_dispatch=True
    ),
    "soft_small": lambda: from_vmoe_checkpoint(str(FIXTURES / "soft_small"), bf16_dispatch=True),
    "soft-moe-tiny": lambda: from_zoo("soft-moe-tiny", bf16_dispatch=True),
}


def main() -> None:
    print(
        "| model | batch | rel err vs PyTorch's own rounding | elements rounded the other way "
        "| rel err vs PyTorch rounding as the graph did | unexplained | routing decisions | result |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in CASES.items():
            source = make()
            graph = Path(tmp) / "graph.onnx"
            export_model(source, graph, routing_outputs=True)
            for batch in BATCHES:
                report = validate_onnx(graph, source, batch=batch)
                err = max(o.max_rel for o in report.outputs)
                r = report.rounding
                before = f"{r.max_rel_before:.2g}" if r else f"{err:.2g}"
                other = f"{r.at_midpoint} of {r.elements:,}" if r else "- (passed as it is)"
                after = f"{err:.2g}" if r else "-"
                decisions = min((x.decisions for x in report.routing), default=None)
                routing = "-" if decisions is None else f"{decisions:.2%}"
                result = "pass" if report.passed else "FAIL"
                print(
                    f"| {name} | {batch} | {before} | {other} | {after} | {r.unexplained if r else '-'} | "
                    f"{routing} | {result} |"
                )


if __name__ == "__main__":
    main()
