"""``moe-export validate``: a graph, an engine or a bundle against PyTorch."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import emit
from exporter.commands.options import (
    COUNT,
    SEED,
    SHARE,
    Number,
    json_option,
    model_options,
    trust_option,
    verify_key_option,
)
from exporter.commands.render import print_report
from exporter.errors import CheckFailed

_FP32 = settings.TOLERANCES[settings.Precision.FP32]


@click.command()
@click.argument("graph", type=click.Path())
@model_options
@click.option("--onnx", "engine_graph", type=click.Path(dir_okay=False), help="Engine files: the graph it came from.")
@click.option(
    "--batch",
    type=COUNT,
    help="Images per run (a multiple of the routing group). Default: the N of the --input-shape the graph was "
    "exported with, else one group.",
)
@click.option(
    "--inputs",
    "inputs_npz",
    type=click.Path(dir_okay=False),
    help="The input images: a .npz, or Polygraphy JSON (--save-inputs; a bundle's inputs.json).",
)
@click.option(
    "--input-seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True, help="Seed of random inputs."
)
@click.option(
    "--rtol",
    type=Number(0),
    help=f"Max |actual-expected| / max|expected| per output. Default: the precision's ({_FP32.rtol:g} for FP32).",
)
@click.option(
    "--min-routing-agreement",
    "routing_agreement",
    type=SHARE,
    help="Smallest share of (token, choice) pairs with identical routing decisions, per layer. "
    f"Default: the precision's ({_FP32.routing_agreement:g} for FP32).",
)
@verify_key_option
@trust_option
@json_option("the parity report")
def validate(
    graph,
    choice,
    engine_graph,
    batch,
    inputs_npz,
    input_seed,
    rtol,
    routing_agreement,
    verify_key,
    trust_module,
    json_out,
):
    """Check an exported graph (ONNX Runtime, CPU) or a TensorRT engine against PyTorch: outputs and
    routing decisions.

    GRAPH is an .onnx file, a bundle folder (its engine on its sample inputs, against the PyTorch
    outputs stored in the bundle: no model code or checkpoint needed on the target) or an .engine file
    (with --onnx, or beside a bundle manifest). The model defaults to the one recorded in the graph at
    export. Exit code 0 on parity, 1 when parity fails, 2 on bad input (or no TensorRT for engines).

    \b
    Examples:
      moe-export validate tiny.onnx
      moe-export validate my.onnx --module samples/01_user_module/my_vit.py:build --input-shape 8,3,32,32
      moe-export validate vmoe-bundle --verify-key signing.key.pub
      moe-export validate model.engine --onnx model.plugins.onnx --batch 16
    """
    import functools

    from exporter.commands.choice import resolve
    from exporter.parity.validate import validate as run_validate

    named = choice.model or choice.module  # else the model the graph records, changed by the options given
    model = dict(changes=functools.partial(resolve, choice) if choice.given and not named else None)
    inputs = dict(batch=choice.batch if batch is None else batch, seed=input_seed, inputs_npz=inputs_npz)
    limits = dict(rtol=rtol, routing_agreement=routing_agreement)
    trust = dict(engine_graph=engine_graph, trust_module=trust_module, verify_key=verify_key)
    report = run_validate(graph, resolve(choice) if named else None, **model, **inputs, **limits, **trust)
    emit(report, print_report, json_out)
    if not report.passed:
        raise CheckFailed(f"{report.graph} does not match {report.model} (see the table above)")
