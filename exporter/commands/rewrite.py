"""``moe-export rewrite``: MoE layers into moe:: plugin nodes."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import emit
from exporter.commands.options import SEED, json_option, output_option
from exporter.commands.render import print_rewrite
from exporter.errors import UserError


@click.command()
@click.argument("graph", type=click.Path(dir_okay=False))
@output_option("-o", "--output", help="The plugin .onnx file to write.")
@click.option("--plan-only", is_flag=True, help="Find and check the MoE layers, print the plan, write nothing.")
@click.option("--seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True, help="Seed of the probe images.")
@json_option("the rewrite report")
def rewrite(graph, output, plan_only, seed, json_out):
    """Replace each MoE layer's routing, dispatch and combine with moe:: TensorRT plugin nodes.

    Every candidate layer is checked by value (one ONNX Runtime run on random images) before it is
    replaced; a layer that fails a check is listed with the reason and left as standard ONNX. Each
    plugin node carries a local function with its standard-op form, so ONNX Runtime (and `validate`)
    run the result on CPU.

    \b
    Examples:
      moe-export rewrite tiny.onnx -o tiny.plugins.onnx
      moe-export rewrite tiny.onnx --plan-only
    """
    from exporter.rewrite.rewrite import rewrite_onnx

    if not plan_only and not output:
        raise UserError("give -o OUT.onnx, or --plan-only to write nothing")
    result = rewrite_onnx(graph, None if plan_only else output, plan_only=plan_only, seed=seed)
    emit(result, print_rewrite, json_out)
