"""``moe-export demo``: the main job on built-in defaults."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import console, escape, phase
from exporter.commands.options import folder_option
from exporter.commands.render import print_bundle, print_export, print_notes, print_report, print_rewrite
from exporter.errors import CheckFailed


@click.command()
@folder_option(
    "-o",
    "--output-dir",
    default=settings.DEMO_OUTPUT_DIR,
    show_default=True,
    help="Where to write the graphs and reports.",
)
def demo(output_dir):
    """The main job on built-in defaults: export and validate a small V-MoE (Batch Prioritized Routing,
    capacity factor 0.5, so tokens are dropped) and a small Soft-MoE, then rewrite both into plugin
    graphs, validate those too, make each model's deploy bundle from them (the plugin kernels
    precompiled to PTX; needs Triton: pip install 'moe-export[plugins]') and draw its routing
    (<model>.routing.png), all on CPU.

    \b
    Example:
      moe-export demo -o out/
    """
    with phase("Loading PyTorch, ONNX and ONNX Runtime (the first run on a machine takes longest)"):
        from exporter.tools import inspect_routing  # noqa: F401  (loaded here, used by routing_picture)
        from exporter.tools.demo import demo as run_demo

    runs = []
    for run in run_demo(output_dir, picture=routing_picture):
        _print_run(run)
        runs.append(run)
    out = console()
    for run in runs:
        out.print(f"routing picture of {escape(run.model)}: [bold]{escape(str(run.picture.path))}[/bold]")
    failed = [run.model for run in runs if not run.passed]
    if failed:
        raise CheckFailed(f"parity or rewrite failed for {', '.join(failed)}")
    out.print(f"all passed; graphs, reports, bundles and pictures in [bold]{escape(str(output_dir))}[/bold]")


def routing_picture(source, graph, dest):
    """The demo's picture of one model: for a V-MoE the exported graph's routing beside PyTorch's (what
    the deployed graph does), for a Soft-MoE (whose graphs expose no routing outputs) the PyTorch model's
    dispatch and combine; digits test sample 0."""
    from exporter.tools.inspect_routing import inspect_routing

    vmoe = source.config is not None and source.config.family == "vmoe"
    return inspect_routing(source, dest, sample=0, graph=graph if vmoe else None)


def _print_run(run) -> None:
    print_export(run.export)
    print_report(run.parity)
    print_rewrite(run.rewrite)
    print_report(run.plugin_parity)
    if run.bundle is not None:
        print_bundle(run.bundle)
    else:
        print_notes([run.bundle_note])
    if run.picture is not None:
        p = run.picture
        console().print(
            f"wrote [bold]{escape(str(p.path))}[/bold] ({p.layout.rows}x{p.layout.cols} panels): the routing of "
            f"{escape(p.image)}"
        )
        print_notes(p.notes)
