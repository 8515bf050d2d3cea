"""``moe-export sweep capacity``: what each capacity factor costs."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import console, emit, escape
from exporter.commands.options import COUNT, floats, json_option, model_options_without, output_option
from exporter.commands.render import mark, print_notes
from exporter.errors import CheckFailed


@click.group("sweep")
def sweep_group():
    """Sweep a routing setting and measure what it costs."""


@sweep_group.command("capacity")
@model_options_without("capacity_factor", "batch_priority")
@click.option(
    "--factors",
    default=",".join(f"{c:g}" for c in settings.SWEEP_CAPACITY_FACTORS),
    show_default=True,
    help="Capacity factors, each run vanilla and with Batch Prioritized Routing.",
)
@click.option("--parity/--no-parity", default=True, show_default=True, help="Export and check the graph at each point.")
@click.option("--images", type=COUNT, help="Digits test images to route (default: all 448), in whole routing groups.")
@output_option("-o", "--output", help="A PNG plot of the sweep.")
@json_option("the sweep")
def sweep_capacity(choice, factors, parity, images, output, json_out):
    """V-MoE: dropped share, output deviation from unlimited capacity, digits test accuracy and exported
    graph parity, per capacity factor, vanilla vs Batch Prioritized Routing. Exit 1 if parity fails.

    \b
    Example:
      moe-export sweep capacity --model vmoe-tiny --checkpoint samples/02_digits/vmoe_digits.safetensors -o sweep.png
    """
    from exporter.commands.choice import resolve
    from exporter.tools.sweep import sweep_capacity as run_sweep

    report = run_sweep(
        resolve(choice), capacity_factors=floats(factors, "--factors"), parity=parity, images=images, plot=output
    )
    emit(report, lambda r: _print_sweep(r, output), json_out)
    if not report.parity_passed:
        raise CheckFailed("the exported graph does not match PyTorch at some capacity factors (see the table)")


def _parity_cell(parity: dict) -> str:
    if parity["status"] == "slots differ":
        return f"[yellow]slots differ[/yellow] ({parity['pairs_differing']} pairs)"
    return mark(parity["passed"])


def _print_sweep(report, output) -> None:
    from rich.table import Table

    out = console()
    acc = report.unlimited_accuracy
    out.print(
        f"{escape(report.model)} on {report.images} digits test images, groups of {report.group_images}; "
        f"unlimited capacity (C={report.unlimited_capacity_factor:g}): accuracy "
        f"{'-' if acc is None else f'{acc:.2%}'}"
    )
    table = Table(box=None, pad_edge=False)
    for col in ("C", "routing", "capacity", "dropped", "gate mass", "unrouted", "deviation", "accuracy", "parity"):
        table.add_column(col, justify="right")
    for p in report.points:
        table.add_row(
            f"{p.capacity_factor:g}",
            "BPR" if p.batch_priority else "vanilla",
            "/".join(str(c) for c in p.capacity.values()),
            f"{p.dropped:.1%}",
            f"{p.dropped_gate_mass:.1%}",
            f"{p.tokens_unrouted:.1%}",
            f"{p.deviation:.3f}",
            "-" if p.accuracy is None else f"{p.accuracy:.2%}",
            "-" if p.parity is None else _parity_cell(p.parity),
        )
    out.print(table)
    if any(p.parity and p.parity["status"] == "slots differ" for p in report.points):
        out.print(
            "[yellow]note:[/yellow] slots differ: same outputs, experts and dropped pairs; only buffer positions "
            "of tokens whose BPR priorities tie in one backend and not in the other"
        )
    print_notes(report.notes)
    if output:
        out.print(f"wrote [bold]{escape(output)}[/bold]")
