"""``moe-export inspect routing``: pictures of where patches are routed."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import console, emit, escape
from exporter.commands.options import (
    NON_NEGATIVE,
    floats,
    indices,
    json_option,
    model_options,
    output_option,
    trust_option,
)
from exporter.commands.render import print_notes
from exporter.errors import UserError


@click.group("inspect")
def inspect_group():
    """Look inside a model: pictures of its routing."""


@inspect_group.command("routing")
@model_options
@click.option("--image", type=click.Path(dir_okay=False), help="A PNG or JPEG, resized to the model's input.")
@click.option("--sample", type=NON_NEGATIVE, help="An image of the digits test split instead (default: sample 0).")
@click.option(
    "--capacity-factors",
    "factors",
    help="V-MoE: one column per factor, each vanilla and BPR; the image is routed in a group of its own. "
    f"Default: {','.join(f'{c:g}' for c in settings.INSPECT_CAPACITY_FACTORS)} (or the one --capacity-factor).",
)
@click.option("--onnx", "graph", type=click.Path(dir_okay=False), help="V-MoE: picture this graph's routing outputs.")
@click.option("--slots", help="Soft-MoE: slots to picture, e.g. 0,5,9 (default: the most concentrated).")
@output_option("-o", "--output", required=True, help="The PNG to write.")
@trust_option
@json_option("the per-panel numbers")
def inspect_routing(choice, image, sample, factors, graph, slots, output, trust_module, json_out):
    """Draw where each patch of one image is routed, per MoE layer.

    V-MoE: patches coloured by first and second expert, dropped ones grey, for several capacity factors,
    vanilla and Batch Prioritized Routing; with --onnx, the exported graph's routing next to PyTorch's.
    Soft-MoE: chosen slots' dispatch weights over the patches and each patch's combine spread.

    \b
    Examples:
      moe-export inspect routing --model vmoe-tiny --checkpoint samples/02_digits/vmoe_digits.safetensors -o r.png
      moe-export inspect routing --model soft-moe-tiny --image digit.png --slots 0,1,2 -o soft.png
      moe-export inspect routing --onnx tiny.onnx --sample 3 -o deployed.png
    """
    from exporter.commands.choice import resolve
    from exporter.tools.inspect_routing import inspect_routing as draw

    capacity_factors = floats(factors, "--capacity-factors") if factors else None
    if choice.capacity_factor is not None:
        if capacity_factors is not None:
            raise UserError("give --capacity-factors (the columns) or --capacity-factor (one column), not both")
        if graph is None:  # one column
            capacity_factors, choice = [choice.capacity_factor], choice.replace(capacity_factor=None)
    recorded = None
    if graph and not (choice.model or choice.module):  # the model the graph records, changed by the options
        from exporter.formats.graph import read_header
        from exporter.parity.parity import recorded_source

        recorded = recorded_source(graph, read_header(graph), trust_module=trust_module)
    picture = draw(
        resolve(choice, recorded),
        output,
        image=image,
        sample=sample,
        capacity_factors=capacity_factors,
        graph=graph,
        slots=indices(slots, "--slots") if slots else None,
    )
    emit(picture, _print_picture, json_out)


def _cell(value) -> str:
    """A table cell: shares (floats up to 1) as percentages, other floats to 3 digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if value <= 1 else f"{value:.3g}"
    return str(value)


def _print_picture(picture) -> None:
    from rich.table import Table

    out = console()
    out.print(
        f"wrote [bold]{escape(str(picture.path))}[/bold] ({picture.layout.width}x{picture.layout.height} px, "
        f"{picture.layout.rows}x{picture.layout.cols} panels): {escape(picture.image)}"
    )
    table = Table(box=None, pad_edge=False)
    for col in picture.stats[0]:
        table.add_column(col, justify="left" if col in ("layer", "column") else "right")
    for row in picture.stats:
        table.add_row(*(escape(_cell(v)) for v in row.values()))
    out.print(table)
    print_notes(picture.notes)
