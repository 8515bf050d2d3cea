"""``moe-export export``: a model to a portable ONNX graph."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import emit
from exporter.commands.options import json_option, model_options, output_option, precision_options
from exporter.commands.render import print_export


@click.command()
@model_options
@output_option("-o", "--output", required=True, help="The .onnx file to write.")
@click.option(
    "--opset",
    type=click.IntRange(settings.MIN_OPSET, settings.MAX_OPSET),
    default=settings.DEFAULT_OPSET,
    show_default=True,
    help=f"ONNX opset ({settings.MIN_OPSET}-{settings.MAX_OPSET}).",
)
@click.option(
    "--routing-outputs",
    is_flag=True,
    help="Expose each V-MoE layer's routing as graph outputs (ignored, with a note, for a model without V-MoE "
    "layers: a Soft-MoE has no routing decisions).",
)
@precision_options
@json_option("an export report")
def export(choice, output, opset, routing_outputs, precision, routing_precision, calibration, json_out):
    """Export a model to a portable ONNX graph (standard ops only, dynamic batch).

    \b
    Examples:
      moe-export export --model vmoe-tiny --capacity-factor 0.5 --batch-priority --routing-outputs -o tiny.onnx
      moe-export export --module samples/01_user_module/my_vit.py:build --input-shape 8,3,32,32 -o my.onnx
      moe-export export --model vmoe-s32-last2-e8 --precision fp16 --routing-outputs -o s32.fp16.onnx
      moe-export export --model vmoe-tiny --precision int8 --calibration images/ --routing-outputs -o tiny.int8.onnx
    """
    from exporter.commands.choice import resolve
    from exporter.export.export import export_model

    result = export_model(
        resolve(choice),
        output,
        example_batch=choice.batch,
        opset=opset,
        routing_outputs=routing_outputs,
        precision=precision,
        routing_precision=routing_precision,
        calibration=calibration,
    )
    emit(result, print_export, json_out)
