"""Pictures of the routing of one image: where each patch goes, in PyTorch or in an exported graph.

V-MoE: one row per MoE layer: the input image, then a panel per routing setting (columns: capacity
factors, each vanilla and Batch Prioritized). Every patch is coloured by its first-choice expert (the
outer square) and its second choice (the inner square), translucent over the image in grey, so the
shade within a colour is the image's brightness; a dropped (token, choice) pair is grey. The class
token has no patch: it counts in the dropped share of the title but is not drawn.

The pictured image is routed in a group of its own (``settings.INSPECT_GROUP_IMAGES`` = 1 image), the
batch-1 deployment setting: capacity is per image and no other image competes for the buffers. A
graph exported with larger groups is fed the image repeated to fill its group, and the first copy is
pictured (both the graph and PyTorch columns then use that same group).

Swin-MoE: as V-MoE, each MoE layer at its own stage's token grid (one square per token, 16 px at
192 px in stage 3), with the attention windows of its block drawn on the image (shifted blocks'
windows wrap around the edges). The image is routed alone: a batch of 1, so the capacity is one image's.

Soft-MoE: per MoE layer, the image, then for a few slots the dispatch weights over the patches (which
patches the slot mixes; one colour scale per row, its bar beside the last slot), then the spread of
each patch's combine weights as the effective number of slots it reads from, ``exp(entropy)``,
between 1 and ``n*p``.

matplotlib is imported inside the drawing functions only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporter import settings
from exporter.backends.onnxruntime import run_onnxruntime
from exporter.errors import UserError
from exporter.fileio import check_output
from exporter.formats.graph import image_input, read_header, routing_layers, routing_output_names
from exporter.models.capture import run_with_routing
from exporter.models.routing import TopKRouting
from exporter.models.soft_moe import SoftMoEMlp, SoftRouter
from exporter.models.swin_moe import SwinBlock, swin_moe_layers
from exporter.models.swin_moe import routing_settings as swin_routing_settings
from exporter.models.vmoe import routing_settings, vmoe_layers
from exporter.progress import phase
from exporter.sources.digits import REFERENCE_NORMALIZATION, image_file, load_split, to_display
from exporter.sources.loading import LoadedModel, ModelSource, load
from exporter.sources.zoo import SOFT_MOE, SWIN_MOE, VMOE
from exporter.tools.figures import panel_grid, save_png, wrap_title

log = logging.getLogger(__name__)

GREY = (0.55, 0.55, 0.55)
# The V-MoE legend's title: the expert colours are drawn translucent over the image in grey.
LEGEND_SHADE = "colour: the patch's expert; a lighter or darker shade of it: the image's brightness beneath"


@dataclass(frozen=True)
class Routing:
    """A V-MoE routing setting: a capacity factor (``None``: the model's own) and BPR or vanilla."""

    capacity_factor: float | None
    batch_priority: bool

    @property
    def label(self) -> str:
        c = "C as built" if self.capacity_factor is None else f"C={self.capacity_factor:g}"
        return f"{c} {'BPR' if self.batch_priority else 'vanilla'}"


@dataclass
class Column:
    """The routing of one image under one setting, per V-MoE layer: expert ``[T, K]``, kept ``[T, K]``."""

    label: str
    experts: dict[str, np.ndarray]
    kept: dict[str, np.ndarray]
    capacity: dict[str, int] = field(default_factory=dict)

    def dropped(self, layer: str) -> float:
        return float(1.0 - self.kept[layer].mean())


@dataclass
class FigureLayout:
    """What was drawn: ``rows`` x ``cols`` panels, their titles row by row, the PNG's pixel size."""

    kind: str  # "vmoe", "swin_moe" or "soft_moe"
    rows: int
    cols: int
    titles: list[str]
    width: int
    height: int
    legend: str = ""  # the V-MoE legend's title: what the colours and their shades mean
    colorbars: list[str] = field(default_factory=list)  # "<layer> | <what it scales>", one per colour bar

    @property
    def panels(self) -> int:
        return self.rows * self.cols


@dataclass
class RoutingPicture:
    path: Path
    model: str
    family: str
    image: str  # where the image came from
    layout: FigureLayout
    layers: list[str]
    stats: list[dict]  # one row per (layer, column or slot): what the table and --json show
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --- inputs ----------------------------------------------------------------------------------------


def pictured_image(
    input_shape: tuple[int, ...], *, image: str | None, sample: int | None, normalization=REFERENCE_NORMALIZATION
) -> tuple[torch.Tensor, str]:
    """``[1, C, H, W]`` input from an image file or a digits test sample (sample 0 by default),
    normalised as the model takes it."""
    if image is not None and sample is not None:
        raise UserError("give either `image` or `sample`, not both")
    if image is not None:
        return image_file(image, input_shape, normalization), str(image)
    sample = 0 if sample is None else sample
    split = load_split(input_shape, normalization=normalization)
    if not 0 <= sample < len(split.test_images):
        raise UserError(f"`sample` must be between 0 and {len(split.test_images) - 1}, got {sample}")
    label = int(split.test_labels[sample])
    return split.test_images[sample : sample + 1], f"digits test sample {sample} (a {label})"


# --- routing capture ---------------------------------------------------------------------------------


def _first_image(routing: dict[str, TopKRouting], tokens: int) -> tuple[dict, dict]:
    experts = {name: r.expert[0, :tokens].numpy() for name, r in routing.items()}
    kept = {name: (r.slot[0, :tokens] >= 0).numpy() for name, r in routing.items()}
    return experts, kept


def torch_column(
    module: nn.Module, images: torch.Tensor, setting: Routing, *, group_images: int, label: str | None = None
) -> Column:
    """The routing PyTorch gives the first image of ``images`` under ``setting``."""
    with routing_settings(
        module,
        capacity_factor=setting.capacity_factor,
        batch_priority=setting.batch_priority,
        group_images=group_images,
    ):
        _, routing = run_with_routing(module, images)
        tokens = next(iter(routing.values())).expert.shape[1] // group_images
        capacity = {n: m.capacity(tokens * group_images) for n, m in vmoe_layers(module)}
    experts, kept = _first_image(routing, tokens)
    return Column(label or setting.label, experts, kept, capacity)


def onnx_routing(graph: str | Path, header, images: np.ndarray) -> dict[str, TopKRouting]:
    """Per V-MoE layer, the routing outputs of an exported graph on ``images``, as ``TopKRouting``
    (weights are not exported: ``weight`` is the kept mask as float)."""
    layers = routing_layers(header)
    if not layers:
        raise UserError(f"{graph} has no routing outputs; export it with `routing_outputs=True`")
    outputs = run_onnxruntime(graph, {image_input(header).name: images})
    routing = {}
    for layer in layers:
        expert_name, kept_name, slot_name = routing_output_names(layer)
        if expert_name not in outputs:
            raise UserError(f"{graph} lists routing of {layer} in its metadata but has no output {expert_name}")
        kept = outputs[kept_name].astype(bool)
        routing[layer] = TopKRouting(
            torch.from_numpy(outputs[expert_name].astype(np.int64)),
            torch.from_numpy(np.where(kept, outputs[slot_name], -1).astype(np.int64)),
            torch.from_numpy(kept.astype(np.float32)),
        )
    return routing


def _graph_group_images(source: ModelSource, loaded: LoadedModel) -> int:
    if source.config is not None and source.config.family == VMOE:
        return source.config.group_images
    return loaded.batch_multiple


def _soft_weights(module: nn.Module, images: torch.Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per Soft-MoE layer, dispatch and combine ``[m, n*p]`` of the first image."""
    found: dict[str, tuple] = {}
    hooks = []
    for name, m in module.named_modules():
        if isinstance(m, SoftMoEMlp):
            router: SoftRouter = m.router

            def hook(_m, _inputs, out, name=name):
                found[name] = (out[0][0].detach().numpy(), out[1][0].detach().numpy())

            hooks.append(router.register_forward_hook(hook))
    try:
        run_with_routing(module, images)
    finally:
        for h in hooks:
            h.remove()
    return found


# --- the picture -----------------------------------------------------------------------------------


def patch_grid(tokens: int, image_size: int) -> tuple[int, int, int]:
    """(grid side, patch pixels, index of the first patch token) for ``tokens`` tokens per image: a
    square grid of patches, optionally after one class token."""
    for skip in (0, 1):
        side = math.isqrt(tokens - skip)
        if side * side == tokens - skip and side > 0 and image_size % side == 0:
            return side, image_size // side, skip
    raise UserError(f"cannot lay {tokens} tokens out as a square grid of patches of a {image_size}px image")


def inspect_routing(
    source: ModelSource,
    dest: str | Path,
    *,
    image: str | None = None,
    sample: int | None = None,
    capacity_factors: Sequence[float] | None = None,
    graph: str | Path | None = None,
    slots: Sequence[int] | None = None,
    dpi: int = settings.FIGURE_DPI,
) -> RoutingPicture:
    """Draws the routing of one image to a PNG at ``dest`` (written atomically).

    Args:
        source: The model (its weights and routing config); with ``graph``, typically the model the
            graph records (``exporter.parity.parity.recorded_source``).
        dest: The PNG to write.
        image: A PNG/JPEG file, resized to the model's input; or
        sample: an index into the digits test split (``exporter.sources.digits``); sample 0 by default.
        capacity_factors: V-MoE columns, each vanilla and BPR, routing the image in a group of its own;
            default ``settings.INSPECT_CAPACITY_FACTORS``.
        graph: V-MoE: picture the routing outputs of this exported graph next to PyTorch's routing of
            the same config, instead of the capacity factors.
        slots: Soft-MoE: the slots to picture (``expert * p + slot``); default the ``INSPECT_SLOTS``
            slots with the most concentrated dispatch, per layer.
        dpi: Pixels per inch of the PNG.
    """
    check_output(dest)
    with phase(log, f"Building {source.name}"):
        loaded = load(source)
    images, where = pictured_image(
        tuple(source.input_shape), image=image, sample=sample, normalization=source.normalization
    )
    display = to_display(images[0], source.normalization)
    if loaded.family in (VMOE, SWIN_MOE):
        return _picture_top_k(loaded, images, display, where, dest, capacity_factors, graph, dpi)
    if loaded.family == SOFT_MOE:
        return _picture_soft_moe(loaded, images, display, where, dest, slots, graph, dpi)
    raise UserError(f"{source.name} has no single MoE family to picture (found: {loaded.family})")


def _picture_top_k(loaded, images, display, where, dest, capacity_factors, graph, dpi) -> RoutingPicture:
    """V-MoE or Swin-MoE: the columns (capacity factors, or the graph beside PyTorch), drawn, and a stats
    row per (layer, column)."""
    source = loaded.source
    swin = loaded.family == SWIN_MOE
    columns, notes = (_swin_columns if swin else _vmoe_columns)(loaded, images, capacity_factors, graph)
    layers = list(columns[0].experts)
    title = f"{source.name}: {'Swin-MoE' if swin else 'V-MoE'} routing of {where}"
    with phase(log, f"Drawing {len(layers)}x{len(columns)} panels"):
        layout = (draw_swin_moe if swin else draw_vmoe)(dest, display, columns, loaded, title=title, dpi=dpi)
    stats = [
        {"layer": layer, "column": c.label, "capacity": c.capacity.get(layer), "dropped": c.dropped(layer)}
        for layer in layers
        for c in columns
    ]
    if graph is not None:
        agree = {layer: _agreement(columns[0], columns[1], layer) for layer in layers}
        for row in stats:
            row["agreement_with_pytorch"] = agree[row["layer"]]
    return RoutingPicture(Path(dest), source.name, loaded.family, where, layout, layers, stats, notes)


def _picture_soft_moe(loaded, images, display, where, dest, slots, graph, dpi) -> RoutingPicture:
    """Soft-MoE: the dispatch and combine weights of the image, drawn, and a stats row per (layer, slot)."""
    source = loaded.source
    if graph is not None:
        raise UserError(
            "Soft-MoE graphs expose no routing outputs (nothing is dropped); picture the PyTorch model without `graph`"
        )
    with phase(log, "Running the model"):
        weights = _soft_weights(loaded.module, images)
    layers = list(weights)
    title = f"{source.name}: Soft-MoE dispatch and combine of {where}"
    with phase(log, f"Drawing {len(layers)} layers"):
        layout, stats = draw_soft_moe(dest, display, weights, loaded, slots=slots, title=title, dpi=dpi)
    return RoutingPicture(Path(dest), source.name, SOFT_MOE, where, layout, layers, stats)


def _vmoe_columns(loaded, images, capacity_factors, graph) -> tuple[list[Column], list[str]]:
    module = loaded.module
    if graph is None:
        capacity_factors = _column_factors(capacity_factors)
        group = settings.INSPECT_GROUP_IMAGES
        columns = []
        with phase(log, f"Routing in PyTorch at {len(capacity_factors)} capacity factors"):
            for c in capacity_factors:
                for bpr in (False, True):
                    columns.append(torch_column(module, images, Routing(c, bpr), group_images=group))
        return columns, []

    header = read_header(graph)
    group = _graph_group_images(loaded.source, loaded)
    batch = images.expand(group, *images.shape[1:]).contiguous()
    with phase(log, f"Running {Path(graph).name} in ONNX Runtime"):
        routing = onnx_routing(graph, header, batch.numpy())
    own = torch_column(module, batch, Routing(None, _own_bpr(module)), group_images=group, label="PyTorch")
    tokens = next(iter(own.experts.values())).shape[0]
    _check_graph_layers(graph, own, routing, loaded)
    experts, kept = _first_image({n: routing[n] for n in own.experts}, tokens)
    config = loaded.source.config
    setting = f"C={config.capacity_factor:g} {'BPR' if config.batch_priority else 'vanilla'}" if config else "as built"
    graph_column = Column(f"ONNX Runtime: {Path(graph).name}", experts, kept, own.capacity)
    own.label = f"PyTorch: {setting}"
    notes = [f"routed in a group of {group} images: the image repeated, the first copy pictured"] if group > 1 else []
    return [graph_column, own], notes


def _column_factors(capacity_factors: Sequence[float] | None) -> Sequence[float]:
    """The capacity factors of the PyTorch columns: the given ones, else ``settings.INSPECT_CAPACITY_FACTORS``."""
    capacity_factors = settings.INSPECT_CAPACITY_FACTORS if capacity_factors is None else capacity_factors
    if not capacity_factors:
        raise UserError("give at least one capacity factor")
    return capacity_factors


def _check_graph_layers(graph: str | Path, own: Column, routing: dict[str, TopKRouting], loaded: LoadedModel) -> None:
    """A user error when the graph lacks routing outputs of a MoE layer of the model."""
    missing = sorted(set(own.experts) - set(routing))
    if missing:
        raise UserError(f"{graph} has no routing outputs for {missing}; was it exported from {loaded.source.name}?")


def _own_bpr(module: nn.Module) -> bool:
    return vmoe_layers(module)[0][1].batch_priority


def swin_column(module: nn.Module, image: torch.Tensor, setting: Routing, *, label: str | None = None) -> Column:
    """The routing PyTorch gives one image of a Swin-MoE (a batch of 1: the capacity is one image's)."""
    with swin_routing_settings(module, capacity_factor=setting.capacity_factor, batch_priority=setting.batch_priority):
        _, routing = run_with_routing(module, image)
        capacity = {n: m.capacity(routing[n].expert.shape[1]) for n, m in swin_moe_layers(module)}
    experts = {n: r.expert[0].numpy() for n, r in routing.items()}
    kept = {n: (r.slot[0] >= 0).numpy() for n, r in routing.items()}
    return Column(label or setting.label, experts, kept, capacity)


def _swin_columns(loaded, images, capacity_factors, graph) -> tuple[list[Column], list[str]]:
    module = loaded.module
    if graph is None:
        capacity_factors = _column_factors(capacity_factors)
        with phase(log, f"Routing in PyTorch at {len(capacity_factors)} capacity factors"):
            columns = [swin_column(module, images, Routing(c, bpr)) for c in capacity_factors for bpr in (False, True)]
        return columns, []
    header = read_header(graph)
    with phase(log, f"Running {Path(graph).name} in ONNX Runtime"):
        routing = onnx_routing(graph, header, images.numpy())
    bpr = swin_moe_layers(module)[0][1].batch_priority
    own = swin_column(module, images, Routing(None, bpr), label="PyTorch")
    _check_graph_layers(graph, own, routing, loaded)
    experts = {n: routing[n].expert[0].numpy() for n in own.experts}
    kept = {n: (routing[n].slot[0] >= 0).numpy() for n in own.experts}
    config = loaded.source.config
    own.label = f"PyTorch: C={config.capacity_factor:g} {'BPR' if config.batch_priority else 'vanilla'}"
    return [Column(f"ONNX Runtime: {Path(graph).name}", experts, kept, own.capacity), own], []


def _agreement(a: Column, b: Column, layer: str) -> float:
    same = (a.experts[layer] == b.experts[layer]) & (a.kept[layer] == b.kept[layer])
    return float(same.mean())


def expert_colors(num_experts: int) -> list[tuple[float, float, float]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_experts <= 10 else "tab20"]
    if num_experts <= 20:
        return [tuple(cmap(i)[:3]) for i in range(num_experts)]
    hsv = matplotlib.colormaps["hsv"]
    return [tuple(hsv(i / num_experts)[:3]) for i in range(num_experts)]


def draw_vmoe(
    dest, display: np.ndarray, columns: list[Column], loaded: LoadedModel, *, title: str, dpi: int
) -> FigureLayout:
    """Rows: V-MoE layers; columns: the input, then the routing settings. Outer square: first choice,
    inner: second."""
    layers = list(columns[0].experts)
    num_experts = max(m.num_experts for _, m in vmoe_layers(loaded.module))
    colors = expert_colors(num_experts)
    tokens = columns[0].experts[layers[0]].shape[0]
    side, px, skip = patch_grid(tokens, display.shape[0])
    fig, axes = panel_grid(
        len(layers), len(columns) + 1, (2.3, 2.5), dpi, top=0.75 if len(columns) > 1 else 1.0, bottom=0.75
    )
    titles = []
    for r, layer in enumerate(layers):
        _input_panel(axes[r][0], display, layer)
        titles.append(f"{layer} | input")
        for c, column in enumerate(columns, start=1):
            ax = axes[r][c]
            ax.imshow(display.mean(axis=-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _draw_choices(ax, column.experts[layer], column.kept[layer], side, px, skip, colors)
            _outline(ax, display)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_column_title(column, layer), fontsize=7.5)
            titles.append(f"{layer} | {column.label}")
    _choices_legend(fig, colors, num_experts, title=LEGEND_SHADE, title_fontsize=7.5)
    subtitle = _choices_caption(columns)
    fig.suptitle(
        wrap_title(fig, f"{title}\n{subtitle}; dropped: share of (token, choice) pairs, class token included"),
        fontsize=9,
    )
    width, height = save_png(fig, dest, dpi)
    return FigureLayout(VMOE, len(layers), len(columns) + 1, titles, width, height, legend=LEGEND_SHADE)


def _choices_legend(fig, colors, experts: int, **title) -> None:
    """The legend below the panels: the first ``experts`` experts' colours and the dropped grey."""
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[e], label=f"expert {e}") for e in range(experts)]
    handles.append(Patch(color=GREY, label="dropped"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 9), fontsize=7.5, frameon=False, **title)


def _choices_caption(columns: list[Column]) -> str:
    """What the squares of a routing panel mean: one choice, or a first and a second."""
    k = next(iter(columns[0].experts.values())).shape[1]
    return "outer square: 1st choice, inner square: 2nd choice" if k > 1 else "colour: the chosen expert"


def _column_title(column: Column, layer: str) -> str:
    """A routing panel's title: the column, the layer's dropped share and its capacity."""
    title = f"{column.label}\ndropped {column.dropped(layer):.0%}"
    if column.capacity.get(layer) is not None:
        title += f", capacity {column.capacity[layer]}"
    return title


def _input_panel(ax, display: np.ndarray, layer: str) -> None:
    """A row's first panel: the image, the layer named beside it."""
    ax.imshow(display, interpolation="nearest")
    ax.set_title("input", fontsize=8)
    ax.set_ylabel(layer, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_choices(ax, experts: np.ndarray, kept: np.ndarray, side: int, px: float, skip: int, colors) -> None:
    """One square per patch token, coloured by its first choice (a centred inner square: its second);
    a dropped choice grey."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    outer, inner = [], []
    outer_colors, inner_colors = [], []
    for t in range(skip, experts.shape[0]):
        i, j = divmod(t - skip, side)
        x0, y0 = j * px - 0.5, i * px - 0.5
        outer.append(Rectangle((x0, y0), px, px))
        outer_colors.append((*colors[experts[t, 0]], 0.55) if kept[t, 0] else (*GREY, 0.85))
        if experts.shape[1] > 1:
            inner.append(Rectangle((x0 + px / 4, y0 + px / 4), px / 2, px / 2))
            inner_colors.append((*colors[experts[t, 1]], 0.95) if kept[t, 1] else (*GREY, 0.95))
    ax.add_collection(PatchCollection(outer, facecolors=outer_colors, edgecolors=(1, 1, 1, 0.25), lw=0.3))
    if inner:
        ax.add_collection(PatchCollection(inner, facecolors=inner_colors, edgecolors="none"))


def draw_swin_moe(
    dest, display: np.ndarray, columns: list[Column], loaded: LoadedModel, *, title: str, dpi: int
) -> FigureLayout:
    """Rows: Swin-MoE layers, each at its stage's token grid with its block's attention windows drawn
    (black lines: a shifted block's windows start ``shift`` tokens in and wrap around); columns: routing
    settings. Outer square: first choice, inner: second."""
    layers = list(columns[0].experts)
    modules = dict(loaded.module.named_modules())
    num_experts = max(m.num_experts for _, m in swin_moe_layers(loaded.module))
    colors = expert_colors(num_experts)
    fig, axes = panel_grid(
        len(layers), len(columns), (2.3, 2.5), dpi, top=0.75 if len(columns) > 2 else 1.0, bottom=0.55
    )
    titles = []
    for r, layer in enumerate(layers):
        block: SwinBlock = modules[layer.removesuffix(".mlp")]
        side, px = block.resolution, display.shape[0] / block.resolution
        edges = sorted({(i * block.window + block.shift) % side for i in range(side // block.window)} - {0})
        for c, column in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(display, interpolation="nearest")
            _draw_choices(ax, column.experts[layer], column.kept[layer], side, px, 0, colors)
            for edge in edges:
                ax.axhline(edge * px - 0.5, color="black", lw=1.2)
                ax.axvline(edge * px - 0.5, color="black", lw=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_column_title(column, layer), fontsize=7.5)
            if c == 0:
                shift = f", shift {block.shift}" if block.shift else ""
                ax.set_ylabel(f"{layer}\n{side}x{side} tokens, windows {block.window}{shift}", fontsize=7)
            titles.append(f"{layer} | {column.label}")
    _choices_legend(fig, colors, min(num_experts, 16))
    choices = _choices_caption(columns)
    fig.suptitle(
        wrap_title(fig, f"{title}\n{choices}; black lines: attention windows; the image routed alone (batch 1)"),
        fontsize=9,
    )
    width, height = save_png(fig, dest, dpi)
    return FigureLayout(SWIN_MOE, len(layers), len(columns), titles, width, height)


def _outline(ax, display: np.ndarray) -> None:
    """The image's bright shapes (a digit's ink) as a white contour, so they show through the colours."""
    grey = display.mean(axis=-1)
    if grey.max() - grey.min() > 1e-3:
        ax.contour(grey, levels=[0.5 * (grey.max() + grey.min())], colors="white", linewidths=0.9)


def _entropy_slots(combine: np.ndarray) -> np.ndarray:
    p = np.clip(combine.astype(np.float64), 1e-30, 1.0)
    return np.exp(-(p * np.log(p)).sum(axis=-1))


def choose_slots(dispatch: np.ndarray, count: int) -> list[int]:
    """The ``count`` slots whose dispatch weights are most concentrated (highest max weight)."""
    return [int(s) for s in np.argsort(-dispatch.max(axis=0), kind="stable")[:count]]


def draw_soft_moe(
    dest,
    display: np.ndarray,
    weights: dict[str, tuple[np.ndarray, np.ndarray]],
    loaded: LoadedModel,
    *,
    slots: Sequence[int] | None,
    title: str,
    dpi: int,
) -> tuple[FigureLayout, list[dict]]:
    """Rows: Soft-MoE layers; columns: the image, the chosen slots' dispatch, the combine spread."""
    layers = list(weights)
    modules = dict(loaded.module.named_modules())
    first_dispatch = weights[layers[0]][0]
    tokens, total_slots = first_dispatch.shape
    _check_slots(slots, total_slots)
    count = len(slots) if slots is not None else min(settings.INSPECT_SLOTS, total_slots)
    side, _, skip = patch_grid(tokens, display.shape[0])
    fig, axes = panel_grid(len(layers), count + 2, (2.3, 2.3), dpi, top=0.7, bottom=0.2, right=0.45)
    titles, stats, colorbars = [], [], []
    for r, layer in enumerate(layers):
        dispatch, combine = weights[layer]
        chosen = list(slots) if slots is not None else choose_slots(dispatch[skip:], count)
        _input_panel(axes[r][0], display, layer)
        titles.append(f"{layer} | input")
        per_expert = modules[layer].slots_per_expert
        shown = _dispatch_panels(axes[r], display, dispatch[skip:], chosen, side, per_expert, layer, titles, stats)
        bar = fig.colorbar(shown, ax=axes[r][count], fraction=0.046, pad=0.04)
        bar.ax.tick_params(labelsize=6)
        bar.ax.set_title("weight", fontsize=6.5)
        colorbars.append(f"{layer} | dispatch weight, slots {', '.join(map(str, chosen))}")
        _combine_panel(fig, axes[r][count + 1], combine[skip:], side, total_slots, layer, titles, stats)
        colorbars.append(f"{layer} | combine spread")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        wrap_title(
            fig,
            f"{title}\ndispatch: the weight of each patch in a slot (softmax over patches); "
            "combine spread: exp(entropy) of each patch's weights over all slots",
        ),
        fontsize=8.5,
    )
    width, height = save_png(fig, dest, dpi)
    layout = FigureLayout(SOFT_MOE, len(layers), count + 2, titles, width, height, colorbars=colorbars)
    return layout, stats


def _check_slots(slots: Sequence[int] | None, total_slots: int) -> None:
    if slots is not None:
        bad = [s for s in slots if not 0 <= s < total_slots]
        if bad:
            raise UserError(
                f"slots {bad} out of range: the model has {total_slots} slots per layer (0..{total_slots - 1})"
            )
        if not slots:
            raise UserError("give at least one slot")


def _dispatch_panels(
    row,
    display: np.ndarray,
    dispatch: np.ndarray,
    chosen: list[int],
    side: int,
    per_expert: int,
    layer: str,
    titles: list[str],
    stats: list[dict],
):
    """The chosen slots' dispatch weights over the patch tokens (``dispatch``: ``[patches, slots]``) in
    ``row[1:]``, on one colour scale; returns the last panel's image (for the row's colour bar)."""
    extent = (-0.5, display.shape[1] - 0.5, display.shape[0] - 0.5, -0.5)
    top = float(dispatch[:, chosen].max())  # one colour scale for the row's dispatch panels
    for c, s in enumerate(chosen, start=1):
        ax = row[c]
        heat = dispatch[:, s].reshape(side, side)
        ax.imshow(display.mean(axis=-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        shown = ax.imshow(heat, cmap="magma", alpha=0.75, extent=extent, interpolation="nearest", vmin=0, vmax=top)
        _outline(ax, display)
        expert, j = divmod(s, per_expert)
        ax.set_title(f"slot {s}: expert {expert}, its slot {j}\nmax dispatch {heat.max():.2f}", fontsize=7.5)
        titles.append(f"{layer} | slot {s}")
        stats.append(
            {
                "layer": layer,
                "slot": s,
                "expert": expert,
                "max_dispatch": float(heat.max()),
                "mean_effective_slots": None,
            }
        )
    return shown


def _combine_panel(
    fig, ax, combine: np.ndarray, side: int, total_slots: int, layer: str, titles: list[str], stats: list[dict]
) -> None:
    """The spread of each patch token's combine weights (``combine``: ``[patches, slots]``) as its
    effective number of slots, with its colour bar."""
    spread = _entropy_slots(combine).reshape(side, side)
    im = ax.imshow(spread, cmap="viridis", vmin=1, vmax=total_slots, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    ax.set_title(f"combine spread (eff. slots\nof {total_slots}): mean {spread.mean():.1f}", fontsize=7.5)
    titles.append(f"{layer} | combine spread")
    stats.append(
        {
            "layer": layer,
            "slot": None,
            "expert": None,
            "max_dispatch": None,
            "mean_effective_slots": float(spread.mean()),
        }
    )
