"""INT8, FP8 and weight-only graphs with the routing in FP32: the two trained digits models and V-MoE
S/32, exported by ``export --precision int8|fp8|w8|w4`` and validated on CPU against the FP32 PyTorch
model. Prints markdown tables for the README.

    python benchmarks/quantize.py               # digits models and V-MoE S/32 (about 10 minutes on 2 cores)
    python benchmarks/quantize.py --digits      # the digits models only (about 6 minutes)
    python benchmarks/quantize.py --s32         # V-MoE S/32 only

Digits: calibrated on 256 images of the training split written as PNG files into a folder
(``--calibration DIR``: read and preprocessed as the model takes images), then run on all 1,797 digits
(padded with 3 copies to whole routing groups of 8; the copies are left out of the accuracy). "accuracy"
is over the 1,797 digits; the FP32 row is PyTorch's. S/32: the zoo's seeded random weights, calibrated
on 256 seeded N(0, 1) images (an .npz), validated on 16 other seeded ones (2 routing groups).

Per graph: its size, the experts' weights before and after (with their scales), the largest output error
relative to the output's scale, the smallest share of agreeing (expert, kept) decisions in any V-MoE
layer, the flipped decisions of all layers and those their gates do not explain, whether ``validate``
passes with the precision's tolerances, and the calibration's wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter import settings  # noqa: E402
from exporter.export.export import export_onnx  # noqa: E402
from exporter.formats.graph import precision as graph_precision  # noqa: E402
from exporter.formats.graph import read_header  # noqa: E402
from exporter.parity.parity import compare_to_reference, onnxruntime_outputs, ort_backend_name, reference_run  # noqa: E402
from exporter.sources.loading import from_zoo, load  # noqa: E402

DIGITS = ROOT / "samples" / "02_digits"
MODELS = {
    "vmoe-tiny digits": ("vmoe-tiny", DIGITS / "vmoe_digits.safetensors"),
    "soft-moe-tiny digits": ("soft-moe-tiny", DIGITS / "soft_moe_digits.safetensors"),
    "V-MoE S/32 (vmoe-s32-last2-e8)": ("vmoe-s32-last2-e8", None),
}
PRECISIONS = ("int8", "fp8", "w8", "w4")
CALIBRATION_IMAGES = 256


def digits_inputs(work: Path, input_shape) -> tuple[Path, Path, np.ndarray]:
    """(calibration folder of PNGs, .npz of all 1,797 digits padded to whole groups, their labels)."""
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits

    from exporter.sources.digits import to_model_input

    digits = load_digits()
    folder = work / "calibration"
    folder.mkdir(exist_ok=True)
    for i in _train_indices()[:CALIBRATION_IMAGES]:  # the calibration images come from the training split
        Image.fromarray(np.round(digits.images[i] / 16 * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    images = to_model_input(torch.from_numpy(digits.images.astype(np.float32) / 16), input_shape).numpy()
    extra = -len(images) % 8  # copies of the first images, to whole routing groups
    padded = np.concatenate([images, images[:extra]])
    npz = work / "digits.npz"
    np.savez(npz, images=padded)
    return folder, npz, digits.target


def _train_indices() -> np.ndarray:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, _ = train_test_split(
        np.arange(len(target)),
        test_size=settings.DIGITS_TEST_IMAGES,
        random_state=settings.DIGITS_SPLIT_SEED,
        stratify=target,
    )
    return train


def run_model(name: str, checkpoint: Path | None, work: Path) -> list[dict]:
    source = from_zoo(name, checkpoint=str(checkpoint) if checkpoint else None)
    loaded = load(source)
    labels, batch, inputs = None, None, None
    if checkpoint is not None:
        calibration, inputs, labels = digits_inputs(work, source.input_shape)
    else:
        calibration = work / "s32.calibration.npz"
        rng = np.random.default_rng(1)
        np.savez(calibration, images=rng.standard_normal((CALIBRATION_IMAGES, *source.input_shape), dtype=np.float32))
        batch = 16
    start = time.perf_counter()
    fp32 = export_onnx(loaded, work / f"{name}.fp32.onnx", routing_outputs=True)
    reference = reference_run(
        source, read_header(fp32.path), batch=batch, inputs_npz=str(inputs) if inputs else None, loaded=loaded
    )
    feeds = {reference.input_name: reference.images}
    rows = []

    def measure(label, result):
        header = read_header(result.path)
        actual, routers = onnxruntime_outputs(result.path, header, feeds)
        report = compare_to_reference(
            reference, actual, header, graph=str(result.path), backend=ort_backend_name(header),
            tolerances=settings.TOLERANCES[graph_precision(header)[0]], routers=routers,
        )  # fmt: skip
        q = result.quantization or {}
        experts = q.get("expert_weight_bytes", (0, 0))
        accuracy = None
        if labels is not None:
            accuracy = float(np.mean(next(iter(actual.values()))[: len(labels)].argmax(-1) == labels))
        rows.append(
            {
                "variant": label,
                "MiB": result.size_bytes / 2**20,
                "expert weights MiB": f"{experts[0] / 2**20:.2f} -> {experts[1] / 2**20:.3f} "
                f"({experts[0] / experts[1]:.2f}x)"
                if experts[1]
                else "-",
                "max rel err": max(o.max_rel for o in report.outputs),
                "decisions": min((r.decisions for r in report.routing), default=None),
                "flips": sum(r.flip_count for r in report.routing) if report.routing else None,
                "unexplained": sum(r.unexplained for r in report.routing) if report.routing else None,
                "validate": "pass" if report.passed else "FAIL",
                "accuracy": accuracy,
                "calibration s": q.get("calibration_seconds") or None,
            }
        )
        print(f"  {label}: {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)

    measure("fp32", fp32)
    if labels is not None:
        rows[0]["accuracy"] = float(np.mean(reference.outputs[0][: len(labels)].argmax(-1) == labels))
    for precision in PRECISIONS:
        result = export_onnx(
            loaded,
            work / f"{name}.{precision}.onnx",
            routing_outputs=True,
            precision=precision,
            calibration=calibration if precision in settings.QUANTIZED_PRECISIONS else None,
        )
        measure(precision, result)
    return rows


def table(title: str, rows: list[dict]) -> str:
    cols = list(rows[0])
    if all(r["accuracy"] is None for r in rows):
        cols.remove("accuracy")
    if all(r["decisions"] is None for r in rows):
        cols = [c for c in cols if c not in ("decisions", "flips", "unexplained")]

    def cell(c, v):
        if v is None:
            return "-"
        if c in ("decisions", "accuracy"):
            return f"{v:.2%}"
        if c in ("MiB", "calibration s"):
            return f"{v:.2f}" if c == "MiB" else f"{v:.1f}"
        if isinstance(v, float):
            return f"{v:.2g}"
        return str(v)

    header = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = "".join("| " + " | ".join(cell(c, r[c]) for c in cols) + " |\n" for r in rows)
    return f"**{title}**\n\n{header}{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true", help="only the two digits models")
    parser.add_argument("--s32", action="store_true", help="only V-MoE S/32")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for title, (name, checkpoint) in MODELS.items():
            if (args.digits and checkpoint is None) or (args.s32 and checkpoint is not None):
                continue
            print(f"{title} ...", file=sys.stderr, flush=True)
            work = Path(tmp) / name
            work.mkdir()
            print(table(title, run_model(name, checkpoint, work)), flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
