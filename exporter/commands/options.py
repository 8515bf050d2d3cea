"""The options commands share: checked number types, output options checked before any work, the
model options as one ``ModelChoice``, precision, trust and signature options, and list parsers.

Only click and the light parts of the library are imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import click

from exporter import settings
from exporter.commands.choice import ROUTING_FIELDS, ModelChoice
from exporter.errors import UserError

# --- option types: every number is checked when the options are parsed -----------------------------

MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take any seed up to this


class Number(click.ParamType):
    """A finite float within bounds (``nan`` and ``inf`` are refused); ``above`` excludes its bound."""

    name = "number"

    def __init__(self, minimum: float | None = None, maximum: float | None = None, *, above: bool = False):
        self.minimum, self.maximum, self.above = minimum, maximum, above

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low_ok = self.minimum is None or (number > self.minimum if self.above else number >= self.minimum)
        if not low_ok or (self.maximum is not None and number > self.maximum):
            self.fail(f"{value!r} is not in {self.describe()}", param, ctx)
        return number

    def describe(self) -> str:
        low = "" if self.minimum is None else f"{self.minimum:g} {'<' if self.above else '<='} "
        high = "" if self.maximum is None else f" <= {self.maximum:g}"
        return f"the range {low}x{high}"


POSITIVE = Number(0, above=True)
SHARE = Number(0, 1)  # a fraction, 0..1
COUNT = click.IntRange(min=1)  # images, runs, batches
NON_NEGATIVE = click.IntRange(min=0)  # warmup runs, sample index
SEED = click.IntRange(0, MAX_SEED)


def _writable(ctx, param, value):
    """An output option checked when the options are parsed, before any work (``fileio.check_output``)."""
    if value is not None and value != "-":
        from exporter.fileio import check_output

        check_output(value, folder=param.type.file_okay is False)
    return value


def json_option(what: str):
    return click.option(
        "--json",
        "json_out",
        metavar="PATH",
        type=click.Path(dir_okay=False, allow_dash=True),
        callback=_writable,
        help=f"Write {what} as JSON ('-' for stdout).",
    )


def output_option(*names: str, **kwargs):
    """A file output (``-o``), checked before any work: not a folder or special file, in a folder that
    can be written (a link is followed)."""
    return click.option(*names, type=click.Path(dir_okay=False), callback=_writable, **kwargs)


def folder_option(*names: str, **kwargs):
    """A folder output (a bundle, a model folder), checked before any work as ``output_option`` is."""
    return click.option(*names, type=click.Path(file_okay=False), callback=_writable, **kwargs)


# --- which model --------------------------------------------------------------------------------

MODEL_OPTIONS = [
    click.option(
        "--model",
        "model",
        metavar="NAME|DIR",
        help="A zoo model (see `moe-export models`) or a folder written by `moe-export import vmoe`.",
    ),
    click.option(
        "--module",
        "module",
        metavar="FILE.py:FACTORY",
        help="A user model: FILE.py:factory or package.module:factory, a callable returning an nn.Module.",
    ),
    click.option(
        "--input-shape",
        metavar="N,C,H,W",
        help="Input images, N,C,H,W or C,H,W (a user module needs it). N: the images export traces with (recorded "
        "in the graph: validate runs that batch too) and bench runs, unless --batch.",
    ),
    click.option(
        "--checkpoint",
        type=click.Path(),
        help="Weights: .safetensors, a PyTorch state dict, or a vmoe checkpoint (PREFIX or PREFIX.index; "
        "alone, without --model, it describes the model too).",
    ),
    click.option("--seed", type=SEED, default=None, help="Seed of the random weights when there is no checkpoint."),
]
ROUTING_OPTIONS = [
    click.option("--k", "k", type=COUNT, help="V-MoE: experts per token (1 or 2 in the papers)."),
    click.option(
        "--capacity-factor", type=POSITIVE, help="V-MoE: capacity factor C (e.g. 1.05; below 1 drops tokens)."
    ),
    click.option("--batch-priority/--no-batch-priority", default=None, help="V-MoE: Batch Prioritized Routing."),
    click.option("--group-images", type=COUNT, help="V-MoE: images per routing group (8 in the papers, 1 for edge)."),
    click.option(
        "--bf16-dispatch/--no-bf16-dispatch",
        default=None,
        help="Round expert inputs and outputs to bfloat16 as the reference does (bit-matches vmoe's eval).",
    ),
]
_CHOICE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelChoice))  # the model options, then the routing ones


def _grouped(f, options, fields, name, build):
    """Adds ``options`` to a command and hands it their values as one argument, ``name=build(values)``."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        values = {k: kwargs.pop(k) for k in fields}
        return f(*args, **{name: build(values)}, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def model_options(f):
    """The model options (``--model``, ``--module``, ``--input-shape``, ``--checkpoint``, ``--seed``)
    and the V-MoE routing overrides, passed to the command as one ``choice: ModelChoice``."""
    return _grouped(f, MODEL_OPTIONS + ROUTING_OPTIONS, _CHOICE_FIELDS, "choice", lambda values: ModelChoice(**values))


def model_options_without(*fields: str):
    """``model_options`` less the options of ``fields`` (those a command sets itself, e.g. the
    sweep's capacity factor), so that ``--help`` lists only what the command takes."""
    assert set(fields) <= set(_CHOICE_FIELDS), fields
    options = dict(zip(_CHOICE_FIELDS, MODEL_OPTIONS + ROUTING_OPTIONS, strict=True))
    kept = [name for name in _CHOICE_FIELDS if name not in fields]

    def decorate(f):
        return _grouped(f, [options[n] for n in kept], kept, "choice", lambda values: ModelChoice(**values))

    return decorate


def routing_options(f):
    """The V-MoE routing overrides alone, passed as ``overrides: dict`` (the given ones)."""
    return _grouped(
        f,
        ROUTING_OPTIONS,
        ROUTING_FIELDS,
        "overrides",
        lambda values: {k: v for k, v in values.items() if v is not None},
    )


def floats(text: str, option: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]``; one clear error otherwise."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a comma-separated list of numbers like 0.5,1,2") from None
    if not values:
        raise UserError(f"{option} needs at least one value")
    if bad := [v for v in values if not (math.isfinite(v) and v > 0)]:
        raise UserError(f"{option} takes finite numbers above 0, not {bad[0]:g}")
    return values


def indices(text: str, option: str) -> list[int]:
    """``"0,5,9"`` -> ``[0, 5, 9]``: non-negative integers; one clear error otherwise."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a comma-separated list of integers like 0,5,9") from None
    if not values or min(values) < 0:
        raise UserError(f"{option} takes one or more integers >= 0, e.g. 0,5,9")
    return values


def target_list(text: str) -> list[str]:
    targets = [t for t in text.replace(" ", "").split(",") if t]
    if not targets:
        raise UserError("--target needs at least one architecture, e.g. sm_87,sm_90")
    return targets


def precision_options(f):
    """``--precision``, ``--routing-precision`` and ``--calibration`` (export, build bundle)."""
    f = click.option(
        "--calibration",
        type=click.Path(path_type=str),
        default=None,
        help="int8/fp8: an .npz holding the graph's input (float32 NxCxHxW) or a folder of PNG/JPEG images "
        "(preprocessed as the model takes them) to calibrate the activations' scales on. Without it: seeded "
        "random images, said in one line.",
    )(f)
    f = click.option(
        "--routing-precision",
        type=click.Choice(settings.ROUTING_PRECISIONS),
        default=settings.RoutingPrecision.FP32.value,
        show_default=True,
        help="fp32: the router and routing math stay FP32 (pinned); reduced: in the reduced type too (to compare).",
    )(f)
    return click.option(
        "--precision",
        type=click.Choice(settings.PRECISIONS),
        default=settings.DEFAULT_PRECISION.value,
        show_default=True,
        help="The graph's precision: fp16/bf16 tokens, weights and experts, with Casts around the FP32 routing; "
        "int8/fp8 explicit Q/DQ (calibrated) on the experts, attention, patch embedding and head, the routing, "
        "LayerNorm and residual adds in FP32; w8/w4 the experts' weights only, INT8 or block-quantized INT4. "
        "Input and outputs stay FP32. TensorRT builds it strongly typed.",
    )(f)


# --- trust: signatures and the code a graph records ---------------------------------------------


def trust_option(f):
    """``--trust-module``: a graph that records a user module may have it imported (its code run)."""
    return click.option(
        "--trust-module",
        is_flag=True,
        help="Import and run the user module the graph records (by default a graph's record of code is refused: "
        "name the module with --module instead).",
    )(f)


def verify_key_option(f):
    """``--verify-key``: a bundle's Ed25519 signature is checked before anything in it is used."""
    return click.option(
        "--verify-key",
        metavar="PUBLIC_KEY",
        type=click.Path(dir_okay=False),
        help="Refuse the bundle unless its manifest is signed by this Ed25519 public key (PEM; moe-export keygen).",
    )(f)
