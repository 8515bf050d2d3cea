"""``moe-export models``: the model zoo."""

from __future__ import annotations

import click

from exporter.commands.console import console, emit, escape
from exporter.commands.options import json_option


@click.command()
@json_option("the list")
def models(json_out):
    """List the model zoo: name, family, parameters, summary.

    \b
    Example:
      moe-export models --json -
    """
    from exporter.sources.zoo import zoo_rows

    rows = zoo_rows()
    emit(rows, _print_models, json_out, data=rows)


def _print_models(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_header=False)  # one model name at the start of each line
    for col in ("model", "family", "params", "summary"):
        table.add_column(col, justify="right" if col == "params" else "left", no_wrap=col != "summary")
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['params'] / 1e6:,.1f}M", escape(r["summary"]))
    console().print(table)
