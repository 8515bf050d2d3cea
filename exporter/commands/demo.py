"""``moe-export demo``: the main job on built-in defaults."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.common import (
    console,
    escape,
    folder_option,
    print_bundle,
    print_export,
    print_notes,
    print_report,
    print_rewrite,
    step,
)
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
    graphs, validate those too and make each model's deploy bundle (the plugin kernels precompiled to
    PTX; needs Triton: pip install 'moe-export[plugins]'), all on CPU.

    \b
    Example:
      moe-export demo -o out/
    """
    from exporter.tools.demo import demo as run_demo

    runs = run_demo(output_dir, step=step, started=_started, done=_print_run)
    failed = [run.model for run in runs if not run.passed]
    if failed:
        raise CheckFailed(f"parity or rewrite failed for {', '.join(failed)}")
    console().print(f"all passed; graphs and reports in [bold]{escape(str(output_dir))}[/bold]")


def _started(name: str, overrides: dict) -> None:
    console().rule(f"{name} {' '.join(f'{k}={v}' for k, v in overrides.items())}")


def _print_run(run) -> None:
    print_export(run.export)
    print_report(run.parity)
    print_rewrite(run.rewrite)
    print_report(run.plugin_parity)
    if run.bundle is not None:
        print_bundle(run.bundle)
    else:
        print_notes([run.bundle_note])
