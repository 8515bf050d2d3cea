"""The capacity trade-off of a V-MoE: for each capacity factor, vanilla and Batch Prioritized Routing,
how much is dropped, how far the output moves from an unlimited-capacity run, the accuracy on the
digits test split, and whether the exported graph still matches PyTorch at that capacity.

Every point routes the same images in the model's own routing groups (``group_images``); a Swin-MoE
routes each chunk of ``settings.SWEEP_CHUNK_IMAGES`` images together (its group is the batch), so its
capacities are those of that batch size. The unlimited run uses capacity factor ``E / k`` (Swin-MoE:
``E``), where an expert can take every token of its group, so nothing is dropped and vanilla and BPR
coincide. matplotlib is imported inside ``plot_sweep`` (through ``exporter.tools.figures``) only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporter import settings
from exporter.backends.onnxruntime import run_onnxruntime
from exporter.compare import compare_output, compare_routing
from exporter.errors import UserError
from exporter.export.export import export_onnx
from exporter.fileio import check_output
from exporter.formats.graph import INPUT_NAME
from exporter.models import swin_moe
from exporter.models.capture import run_with_routing
from exporter.models.routing import TopKRouting, check_capacity_factor
from exporter.models.vmoe import routing_settings, unlimited_capacity_factor, vmoe_layers
from exporter.progress import phase
from exporter.sources.digits import NUM_CLASSES, accuracy, load_split
from exporter.sources.loading import LoadedModel, ModelSource, load
from exporter.sources.zoo import SWIN_MOE, VMOE
from exporter.tools.figures import pyplot, save_png

log = logging.getLogger(__name__)

# Parity of a sweep point's graph. "slots differ": the outputs are within tolerance and every (token,
# choice) has the same expert and the same kept/dropped decision; only buffer positions differ, which
# happens under BPR when two tokens' priorities tie exactly in one backend and differ by a rounding
# error in the other (the tie-break then orders them differently). It changes no output.
PARITY_PASS, PARITY_SLOTS, PARITY_FAIL = "pass", "slots differ", "FAIL"


@dataclass
class SweepPoint:
    capacity_factor: float
    batch_priority: bool
    capacity: dict[str, int]  # per V-MoE layer, slots per expert and group
    dropped: float  # share of (token, choice) pairs dropped, all V-MoE layers together
    dropped_per_layer: dict[str, float]
    dropped_gate_mass: float  # share of the routed gate mass (sum of top-k gates) that was dropped
    tokens_unrouted: float  # share of tokens with every choice dropped (only the residual passes)
    deviation: float  # ||logits - unlimited logits|| / ||unlimited logits|| over all images
    same_prediction: float  # share of images with the unlimited run's top-1 class
    accuracy: float | None  # on the digits test labels (10-class models only)
    parity: dict | None = None  # exported graph vs PyTorch at this point


@dataclass
class SweepReport:
    model: str
    checkpoint: str | None
    images: int
    group_images: int
    unlimited_capacity_factor: float
    unlimited_accuracy: float | None
    points: list[SweepPoint]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def parity_passed(self) -> bool:
        return all(p.parity is None or p.parity["passed"] for p in self.points)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parity_passed"] = self.parity_passed
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class _Run:
    logits: torch.Tensor
    routing: dict[str, TopKRouting]  # groups of every chunk concatenated
    gates: dict[str, torch.Tensor]  # [G, S, E]


def _layers(loaded: LoadedModel) -> list:
    return swin_moe.swin_moe_layers(loaded.module) if loaded.family == SWIN_MOE else vmoe_layers(loaded.module)


def _settings(loaded: LoadedModel, **routing):
    """The routing overrides of the model's family (Swin-MoE has no routing groups to set)."""
    module = loaded.module
    return (
        swin_moe.routing_settings(module, **routing)
        if loaded.family == SWIN_MOE
        else routing_settings(module, **routing)
    )


def _token_axis(loaded: LoadedModel) -> int:
    """The axis routing decisions of several chunks join on: groups (V-MoE), tokens (Swin-MoE: one group)."""
    return 1 if loaded.family == SWIN_MOE else 0


def _forward(loaded: LoadedModel, images: torch.Tensor, batch: int) -> _Run:
    layers = _layers(loaded)
    gates: dict[str, list] = {name: [] for name, _ in layers}
    hooks = [
        m.router.register_forward_hook(
            lambda _m, _i, out, name=name: gates[name].append(torch.softmax(out.float(), -1))
        )
        for name, m in layers
    ]
    logits, routing = [], {name: [] for name, _ in layers}
    try:
        for i in range(0, len(images), batch):
            out, r = run_with_routing(loaded.module, images[i : i + batch])
            logits.append(out[0])
            for name in routing:
                routing[name].append(r[name])
    finally:
        for h in hooks:
            h.remove()
    axis = _token_axis(loaded)
    merged = {name: TopKRouting(*(torch.cat(parts, axis) for parts in zip(*rs))) for name, rs in routing.items()}
    return _Run(torch.cat(logits), merged, {name: torch.cat(g, axis) for name, g in gates.items()})


def _group_tokens(loaded: LoadedModel, layer: str, run: _Run, batch: int) -> int:
    """Tokens routed together in a layer: a V-MoE group, or a Swin-MoE chunk of ``batch`` images (the
    first chunk's: a last, smaller one routes fewer)."""
    tokens = run.routing[layer].slot.shape[1]
    return tokens * batch // len(run.logits) if loaded.family == SWIN_MOE else tokens


def _drop_stats(run: _Run) -> tuple[float, dict[str, float], float, float]:
    pairs = dropped = 0
    per_layer, mass, lost, unrouted, tokens = {}, 0.0, 0.0, 0, 0
    for name, r in run.routing.items():
        gone = r.slot < 0
        per_layer[name] = float(gone.float().mean())
        pairs += gone.numel()
        dropped += int(gone.sum())
        routed = run.gates[name].gather(-1, r.expert)  # [G, S, K] gates of the chosen experts
        mass += float(routed.sum())
        lost += float(routed[gone].sum())
        unrouted += int(gone.all(dim=-1).sum())
        tokens += gone.shape[0] * gone.shape[1]
    return dropped / pairs, per_layer, lost / mass if mass else 0.0, unrouted / tokens


def _parity(loaded: LoadedModel, images: torch.Tensor, run: _Run, folder: Path, tag: str, batch: int) -> dict:
    path = folder / f"{tag}.onnx"
    example = loaded.batch_multiple * settings.EXPORT_EXAMPLE_GROUPS
    export_onnx(loaded, path, routing_outputs=True, example_batch=example)
    chunks = [run_onnxruntime(path, {INPUT_NAME: images[i : i + batch].numpy()}) for i in range(0, len(images), batch)]
    axis = _token_axis(loaded)  # the batches PyTorch ran: a Swin-MoE's routing group is its batch
    actual = {n: np.concatenate([c[n] for c in chunks], axis if n.startswith("routing.") else 0) for n in chunks[0]}
    tol = settings.FP32_TOLERANCES
    out = compare_output("logits", run.logits.numpy(), actual["logits"], tol.rtol)
    routing = [compare_routing(name, r, actual, tol.routing_agreement) for name, r in run.routing.items()]
    for f in folder.glob(f"{tag}.onnx*"):
        f.unlink()
    passed = out.passed and all(r.passed for r in routing)
    status = PARITY_FAIL if not passed else PARITY_SLOTS if any(r.slot_swaps for r in routing) else PARITY_PASS
    return {
        "status": status,
        "passed": status != PARITY_FAIL,
        "max_rel": out.max_rel,
        "routing_agreement": min(r.agreement for r in routing),
        "pairs_differing": sum(round((1 - r.agreement) * r.pairs) for r in routing),
        "dropped_graph": float(np.mean([r.dropped_actual for r in routing])),
    }


def sweep_capacity(
    source: ModelSource,
    *,
    capacity_factors: Sequence[float] = settings.SWEEP_CAPACITY_FACTORS,
    parity: bool = True,
    images: int | None = None,
    plot: str | Path | None = None,
) -> SweepReport:
    """Runs the sweep on the digits test split (resized to the model's input).

    Args:
        source: A V-MoE model; a digits-trained checkpoint makes the accuracy meaningful.
        capacity_factors: The factors to try, each with vanilla and Batch Prioritized Routing.
        parity: Export each point's graph (routing outputs included) and compare it with PyTorch on
            the same images: outputs within the fp32 tolerance and identical routing.
        images: Test images to route (at most the split's 448, rounded down to whole routing
            groups); all of them by default.
        plot: Also draw the sweep to this PNG (``plot_sweep``).
    """
    start = time.perf_counter()
    if plot is not None:
        check_output(plot)
    source, factors = _check_request(source, capacity_factors, images)
    with phase(log, f"Building {source.name}"):
        loaded = load(source)
    if loaded.family not in (VMOE, SWIN_MOE):
        raise UserError(f"sweep capacity needs a V-MoE or Swin-MoE model; {source.name} is {loaded.family}")
    images, labels, batch, notes = _test_images(source, loaded, images)
    count = len(images)
    unlimited = (swin_moe.unlimited_capacity_factor if loaded.family == SWIN_MOE else unlimited_capacity_factor)(
        loaded.module
    )
    with (
        phase(log, f"Unlimited capacity (C={unlimited:g}) on {count} digits"),
        _settings(loaded, capacity_factor=unlimited),
    ):
        reference = _forward(loaded, images, batch)
    points = []
    with tempfile.TemporaryDirectory(prefix="moe-export-sweep.") as tmp:
        for c in factors:
            for bpr in (False, True):
                points.append(
                    _sweep_point(loaded, images, labels, batch, reference, c, bpr, Path(tmp) if parity else None)
                )
    report = SweepReport(
        model=source.name,
        checkpoint=source.checkpoint,
        images=count,
        group_images=batch if loaded.family == SWIN_MOE else loaded.batch_multiple,
        unlimited_capacity_factor=unlimited,
        unlimited_accuracy=_accuracy(reference.logits, labels),
        points=points,
        seconds=time.perf_counter() - start,
        notes=notes,
    )
    if plot is not None:
        plot_sweep(report, plot)
    return report


def _check_request(
    source: ModelSource, capacity_factors: Sequence[float], images: int | None
) -> tuple[ModelSource, list[float]]:
    """The model to sweep and its capacity factors (sorted, each once); a user error for an image count
    below 1 or no valid factor."""
    if images is not None and images < 1:
        raise UserError(f"`images` must be at least 1, got {images}")
    factors = sorted({float(c) for c in capacity_factors})
    if not factors:
        raise UserError("give at least one capacity factor")
    for c in factors:
        check_capacity_factor(c)
    return source, factors


def _test_images(
    source: ModelSource, loaded: LoadedModel, images: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    """(images, labels, images per chunk, notes): the first ``images`` digits test images (all by
    default), rounded down to whole routing groups."""
    split = load_split(tuple(source.input_shape), normalization=source.normalization)
    multiple = loaded.batch_multiple
    available = len(split.test_images) if images is None else min(images, len(split.test_images))
    count = available // multiple * multiple
    if count == 0:
        raise UserError(f"{available} images make no whole routing group of {multiple} images")
    batch = multiple * max(1, settings.SWEEP_CHUNK_IMAGES // multiple)
    if loaded.family == SWIN_MOE:  # its routing group is the batch: as many images as there are, at most a chunk
        batch = min(batch, count)
    notes = []
    if count < len(split.test_images):
        notes.append(f"{count} of {len(split.test_images)} test images: a whole number of routing groups")
    if source.checkpoint is None:
        notes.append("seeded random weights (no `checkpoint`): accuracy is chance level")
    return split.test_images[:count], split.test_labels[:count], batch, notes


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The digits test accuracy, for a 10-class model only."""
    return accuracy(logits, labels) if logits.shape[-1] == NUM_CLASSES else None


def _sweep_point(
    loaded: LoadedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    reference: _Run,
    c: float,
    bpr: bool,
    parity_folder: Path | None,
) -> SweepPoint:
    """One capacity factor, vanilla or BPR: its drops, capacity, distance from the unlimited run and
    accuracy; with ``parity_folder``, the parity of its exported graph (written there and removed)."""
    label = f"C={c:g} {'BPR' if bpr else 'vanilla'}"
    with (
        phase(log, label + (", export and parity" if parity_folder is not None else "")),
        _settings(loaded, capacity_factor=c, batch_priority=bpr),
    ):
        run = _forward(loaded, images, batch)
        dropped, per_layer, mass, unrouted = _drop_stats(run)
        capacity = {n: m.capacity(_group_tokens(loaded, n, run, batch)) for n, m in _layers(loaded)}
        tag = f"c{c:g}_{int(bpr)}"
        check = _parity(loaded, images, run, parity_folder, tag, batch) if parity_folder is not None else None
    ref_norm = float(reference.logits.norm())
    return SweepPoint(
        capacity_factor=c,
        batch_priority=bpr,
        capacity=capacity,
        dropped=dropped,
        dropped_per_layer=per_layer,
        dropped_gate_mass=mass,
        tokens_unrouted=unrouted,
        deviation=float((run.logits - reference.logits).norm()) / ref_norm if ref_norm else 0.0,
        same_prediction=float((run.logits.argmax(-1) == reference.logits.argmax(-1)).float().mean()),
        accuracy=_accuracy(run.logits, labels),
        parity=check,
    )


def plot_sweep(report: SweepReport, dest: str | Path, *, dpi: int = settings.FIGURE_DPI) -> tuple[int, int]:
    """Three panels against the capacity factor: dropped share, accuracy, output deviation. Returns
    the PNG's pixel size."""
    plt = pyplot()
    has_acc = report.unlimited_accuracy is not None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), dpi=dpi)
    styles = {False: ("tab:red", "o", "vanilla"), True: ("tab:blue", "s", "BPR")}
    for bpr, (color, marker, name) in styles.items():
        pts = [p for p in report.points if p.batch_priority == bpr]
        cs = [p.capacity_factor for p in pts]
        axes[0].plot(cs, [p.dropped for p in pts], color=color, marker=marker, label=f"{name}: (token, choice) pairs")
        axes[0].plot(cs, [p.dropped_gate_mass for p in pts], color=color, ls="--", label=f"{name}: gate mass")
        y = [p.accuracy for p in pts] if has_acc else [p.same_prediction for p in pts]
        axes[1].plot(cs, y, color=color, marker=marker, label=name)
        axes[2].plot(cs, [p.deviation for p in pts], color=color, marker=marker, label=name)
        failed = [(p.capacity_factor, v) for p, v in zip(pts, y) if p.parity and p.parity["status"] == PARITY_FAIL]
        if failed:
            axes[1].scatter(*zip(*failed), marker="x", s=80, color="black", zorder=5, label=f"{name}: parity FAIL")
    if has_acc:
        axes[1].axhline(report.unlimited_accuracy, color="grey", ls=":", label="unlimited capacity")
    axes[0].set_title("dropped share")
    axes[1].set_title("digits test accuracy" if has_acc else "same top-1 as unlimited capacity")
    axes[2].set_title("output deviation from unlimited capacity\n||logits - ref|| / ||ref||")
    for ax in axes:
        ax.set_xlabel("capacity factor C")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    checked = [p for p in report.points if p.parity is not None]
    parity = "parity not checked"
    if checked:
        counts = {s: sum(p.parity["status"] == s for p in checked) for s in (PARITY_PASS, PARITY_SLOTS, PARITY_FAIL)}
        parity = f"exported graph parity at {len(checked)} points: " + ", ".join(
            f"{n} {s}" for s, n in counts.items() if n
        )
    fig.suptitle(
        f"{report.model}: capacity sweep on {report.images} digits test images, groups of "
        f"{report.group_images} images; {parity}",
        fontsize=10,
    )
    fig.tight_layout()
    return save_png(fig, dest, dpi)
