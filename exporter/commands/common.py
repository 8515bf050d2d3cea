"""What every command shares: the console, progress lines, the JSON report option, the model options
(one ``ModelChoice``), and the parity table that validate, demo and build engine print.

Only click and the light parts of the library are imported here; each command imports what it
runs inside its body, so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import sys
import time
from collections import Counter
from contextlib import contextmanager

import click

from exporter import settings
from exporter.errors import UserError
from exporter.sources.choice import ROUTING_FIELDS, ModelChoice


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


STDOUT_CLOSED = "the report could not be written: stdout is closed (give it a file or pipe, or use --json FILE)"


def _broken_pipe():
    raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def console(stderr: bool = False):
    if not stderr and sys.stdout is None:  # Python's stdout when the command started with it closed
        raise UserError(STDOUT_CLOSED)
    from rich.console import Console

    out = Console(stderr=stderr, highlight=False)
    out.on_broken_pipe = _broken_pipe  # rich would exit 1 in silence; the CLI reports it (exit 2)
    if not out.is_terminal:  # pipes and files: long lines rather than wrapped table cells
        out.width = 200
    return out


@contextmanager
def step(message: str):
    """Shows a spinner (or a start line when not on a terminal) and the time a step took."""
    err = console(stderr=True)
    start = time.perf_counter()
    if err.is_terminal:
        with err.status(escape(message) + " ..."):
            yield
    else:
        err.print(f"... {escape(message)}")
        yield
    err.print(f"[green]✓[/green] {escape(message)} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def progress_once():
    """A progress callback that prints each phase once, when it starts (TensorRT's build phases)."""
    err = console(stderr=True)
    seen = set()

    def report(text: str) -> None:
        phase = text.rsplit(" (", 1)[0]
        if phase not in seen:
            seen.add(phase)
            err.print(f"[dim]  {escape(text)}[/dim]")

    return report


def progress_lines():
    """A progress callback that prints every line, dimmed, on stderr."""
    err = console(stderr=True)
    return lambda text: err.print(f"[dim]  {escape(text)}[/dim]")


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


def write_json_out(dest: str, data) -> None:
    if dest == "-":
        if sys.stdout is None:
            raise UserError(STDOUT_CLOSED)
        click.echo(json.dumps(data, indent=2))
    else:
        from exporter.fileio import write_json

        write_json(dest, data)


def emit(result, printer, json_out: str | None) -> None:
    """The human-readable report (unless JSON goes to stdout), then the JSON report if asked for."""
    if json_out != "-":
        printer(result)
    if json_out:
        write_json_out(json_out, result.to_dict())


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


# --- the parity table -------------------------------------------------------------------------------


def share(x: float) -> str:
    """A percentage that never rounds a shortfall up to 100%."""
    return "100%" if x == 1.0 else f"{math.floor(x * 1e4) / 1e2:.2f}%"


def mark(ok: bool) -> str:
    return "[green]pass[/green]" if ok else "[red]FAIL[/red]"


def print_report(report) -> None:
    """A ParityReport: outputs, routing per V-MoE layer, notes, verdict."""
    from rich.table import Table

    out = console()
    precision = ""
    if report.precision != "fp32":
        routing = "routing in FP32" if report.routing_precision == "fp32" else "routing reduced too"
        precision = f", {report.precision} ({routing})"
    out.print(
        f"[bold]{escape(report.graph)}[/bold] vs PyTorch {escape(report.model)} "
        f"on {report.backend}, batch {report.batch}{precision}"
    )
    t = Table(title="outputs", title_justify="left", box=None, pad_edge=False)
    for col in ("output", "shape", "max abs err", "max rel err", f"rel tol {report.tolerances['rtol']:g}"):
        t.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for o in report.outputs:
        t.add_row(escape(o.name), "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", mark(o.passed))
    out.print(t)
    if report.routing:
        t = Table(title="routing per V-MoE layer", title_justify="left", box=None, pad_edge=False)
        cols = ("layer", "pairs", "expert", "kept", "slot", "all", "slot swaps", "dropped (torch / graph)", "")
        for col in cols:
            t.add_column(col, justify="left" if col == "layer" else "right")
        for r in report.routing:
            t.add_row(
                escape(r.layer),
                str(r.pairs),
                share(r.expert),
                share(r.kept),
                share(r.slot),
                share(r.agreement),
                str(r.slot_swaps),
                f"{r.dropped_expected:.1%} / {r.dropped_actual:.1%}",
                mark(r.passed),
            )
        out.print(t)
        agreement = report.tolerances["routing_agreement"]
        if agreement < 1 or any(r.decisions < 1 for r in report.routing):
            out.print(
                "[yellow]note:[/yellow] pass/FAIL judges each pair's decisions, its expert and kept/dropped "
                f"together: at least {share(agreement)} of the pairs per layer (lowest here "
                f"{share(min(r.decisions for r in report.routing))}). slot and all are shown, not judged: one "
                "flipped expert choice moves the buffer position of every later token of both experts in its "
                "group, so slots differ far more often than decisions (and slot swaps only count where every "
                "decision agrees)"
            )
    else:
        out.print(f"routing: {report.routing_status}")
    explained = [r for r in report.routing if r.gate_error is not None]
    if explained:
        t = Table(title="flipped decisions per V-MoE layer", title_justify="left", box=None, pad_edge=False)
        cols = ("layer", "flips", "gates", "cascade", "unexplained", "max gate err", "out err: flipped / clean images")
        for col in cols:
            t.add_column(col, justify="left" if col == "layer" else "right")
        for r in explained:
            causes = Counter(r.causes)
            errs = " / ".join("-" if e is None else f"{e:.3g}" for e in (r.output_error_flipped, r.output_error_clean))
            t.add_row(
                escape(r.layer),
                str(r.flip_count),
                str(causes["gates"]),
                str(causes["cascade"]),
                str(r.unexplained) if not r.unexplained else f"[red]{r.unexplained}[/red]",
                f"{r.gate_error:.3g}",
                errs,
            )
        out.print(t)
        if any(r.flip_count for r in explained):
            out.print(
                "[yellow]note:[/yellow] a flip's cause is [bold]gates[/bold] when the reference's two competing "
                "gates (or priorities) were closer than the graph's deviation from them, [bold]cascade[/bold] when "
                "an expert flip earlier in the group moved its buffer position (--json lists each flip)"
            )
    if report.soft_routing:
        t = Table(title="Soft-MoE weights per layer", title_justify="left", box=None, pad_edge=False)
        for col in ("layer", "dispatch max abs err", "(rel)", "combine max abs err", "(rel)"):
            t.add_column(col, justify="left" if col == "layer" else "right")
        for r in report.soft_routing:
            t.add_row(
                escape(r.layer),
                f"{r.dispatch_max_abs:.3g}",
                f"{r.dispatch_max_rel:.3g}",
                f"{r.combine_max_abs:.3g}",
                f"{r.combine_max_rel:.3g}",
            )
        out.print(t)
    if report.rounding is not None:
        _print_rounding(out, report.rounding, report.tolerances["rtol"])
    if any(r.slot_swaps for r in report.routing):
        out.print(
            "[yellow]note:[/yellow] slot swaps: tokens with the same expert and kept decision took each other's "
            "buffer slots (tied priorities ordered differently); outputs are unaffected"
        )
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    out.print(f"{mark(report.passed)} ({report.seconds:.1f}s)")


def _print_rounding(out, r, rtol: float) -> None:
    """bf16 dispatch: the graph's bfloat16 roundings against PyTorch's (``compare.RoundingParity``)."""
    from rich.table import Table

    t = Table(title="bfloat16 dispatch roundings", title_justify="left", box=None, pad_edge=False)
    cols = ("roundings", "elements", "other way at a midpoint", "unexplained", "max rel err before", "")
    for col in cols:
        t.add_column(col, justify="right")
    unexplained = str(r.unexplained) if not r.unexplained else f"[red]{r.unexplained}[/red]"
    t.add_row(
        str(r.roundings), f"{r.elements:,}", str(r.at_midpoint), unexplained, f"{r.max_rel_before:.3g}", mark(r.passed)
    )
    out.print(t)
    out.print(
        f"[yellow]note:[/yellow] {r.at_midpoint} rounded elements lie within {rtol:g} (of their tensor's scale) of a "
        "midpoint between two bfloat16 values, where float32 noise decides the way they round, and the graph took "
        "the other way; PyTorch ran again rounding them as the graph did, and the tables above compare against "
        f"that run (against PyTorch's own rounding the max rel err was {r.max_rel_before:.3g})"
    )


def print_notes(notes) -> None:
    out = console()
    for note in notes:  # one line each, however long: a note names files and lines to find
        out.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)


# --- reports more than one command prints --------------------------------------------------------


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
        default="fp32",
        show_default=True,
        help="fp32: the router and routing math stay FP32 (pinned); reduced: in the reduced type too (to compare).",
    )(f)
    return click.option(
        "--precision",
        type=click.Choice(settings.PRECISIONS),
        default=settings.DEFAULT_PRECISION,
        show_default=True,
        help="The graph's precision: fp16/bf16 tokens, weights and experts, with Casts around the FP32 routing; "
        "int8/fp8 explicit Q/DQ (calibrated) on the experts, attention, patch embedding and head, the routing, "
        "LayerNorm and residual adds in FP32; w8/w4 the experts' weights only, INT8 or block-quantized INT4. "
        "Input and outputs stay FP32. TensorRT builds it strongly typed.",
    )(f)


def print_quantization(q: dict) -> None:
    """What an int8/fp8/w8/w4 export quantized, its calibration and the tokens each expert saw."""
    out = console()
    before, after = q["expert_weight_bytes"]
    if before:
        out.print(
            f"expert weights: {before / 2**20:,.2f} MiB -> {after / 2**20:,.2f} MiB ({before / max(after, 1):.2f}x "
            f"smaller); all weights {q['weight_bytes'][0] / 2**20:,.2f} -> {q['weight_bytes'][1] / 2**20:,.2f} MiB"
        )
    kept = ", ".join(f"{n} {reason}" for reason, n in q["float_nodes"].items())
    if kept:
        out.print(f"kept in FP32: {escape(kept)}; LayerNorm, softmax and residual adds carry no Q/DQ")
    if q["calibration"]:
        out.print(f"calibration: {escape(q['calibration'])} ({q['calibration_seconds']:.1f}s)", soft_wrap=True)
    for layer, tokens in q["expert_tokens"].items():
        out.print(escape(f"  {layer}: calibration tokens per expert {', '.join(map(str, tokens))}"))
    for warning in q["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)


def print_export(result) -> None:
    out = console()
    precision, quantized = "", result.quantization
    if quantized is not None:
        done = sum(quantized["quantized_nodes"].values())
        precision = f", {result.precision} (routing in FP32; {done} MatMul/Gemm/Conv nodes quantized)"
    elif result.precision != "fp32":
        routing = "routing in FP32" if result.routing_precision == "fp32" else f"routing in {result.precision} too"
        kept = sum(result.fp32_nodes.values())
        precision = f", {result.precision} ({routing}; {kept} float nodes in FP32, {result.casts} Casts)"
    out.print(
        f"wrote [bold]{escape(str(result.path))}[/bold] ({result.size_bytes / 2**20:,.1f} MiB, opset {result.opset}, "
        f"{sum(result.op_counts.values())} nodes{precision}, export {result.seconds:.1f}s)"
    )
    for name, (dtype, dims) in {**result.inputs, **result.outputs}.items():
        kind = "input " if name in result.inputs else "output"
        out.print(escape(f"  {kind} {name}: {dtype}[{', '.join(map(str, dims))}]"))
    if not result.dynamic_batch:
        out.print("[yellow]warning:[/yellow] the model fixes its batch size, so the graph has a static batch")
    checked = ", ".join(f"{b} ({err:.1e})" for b, err in result.checked.items())
    if result.precision == "fp32":
        out.print(f"checked against PyTorch at batch {checked} (max rel err)")
    else:  # the reduced graph's own differences are validate's to report, flips explained
        out.print(f"checked: its FP32 trace against PyTorch at batch {checked}, and the {result.precision} graph runs")
    if quantized is not None:
        print_quantization(quantized)
    if result.overflows:
        names = ", ".join(result.overflows[:5]) + (" ..." if len(result.overflows) > 5 else "")
        out.print(
            f"[yellow]warning:[/yellow] {len(result.overflows)} weights or constants hold finite values beyond "
            f"{result.precision}'s range, now infinite: {escape(names)}"
        )
    if result.findings:
        out.print(f"[yellow]warning:[/yellow] {len(result.findings)} TensorRT portability findings:")
        for f in result.findings[:20]:
            out.print(escape(f"  - {f}"))
    else:
        out.print("portable: standard ONNX ops only, none of the TensorRT hazards")
    if result.rtx_parse is not None:  # TensorRT for RTX's parser, beside the allow-list
        parsed = result.rtx_parse
        if parsed["parsed"]:
            out.print(f"TensorRT for RTX {parsed['version']} parses it ({parsed['layers']} layers)")
        else:
            first = parsed["errors"][0] if parsed["errors"] else {"op": "?", "node": "?", "message": "unknown"}
            out.print(
                f"[yellow]warning:[/yellow] TensorRT for RTX {parsed['version']} refuses it: {escape(first['op'])} "
                f"node {escape(repr(first['node']))}: {escape(first['message'])}"
            )
    print_notes(result.notes)


def print_rewrite(result) -> None:
    from rich.table import Table

    out = console()
    t = Table(title="MoE layers", title_justify="left", box=None, pad_edge=False)
    for col in ("layer", "family", "routing", "dispatch", "combine", ""):
        t.add_column(col)
    for layer in result.layers:
        if layer.replaced:
            cells = [escape(n.describe()) for n in layer.nodes]
            t.add_row(
                escape(layer.layer), layer.family, *cells, "[green]replaced[/green]" if result.path else "planned"
            )
        else:
            t.add_row(escape(layer.layer), layer.family, "", "", "", "[yellow]declined[/yellow]")
    out.print(t)
    for layer in result.declined:
        out.print(f"[yellow]declined[/yellow] {escape(layer.layer)}: {escape(layer.reason)}")
    counts = ", ".join(f"{n} {p}" for p, n in result.counts.items()) or "no plugin nodes"
    if result.path:
        out.print(f"wrote [bold]{escape(str(result.path))}[/bold]: {counts} ({result.seconds:.1f}s)")
    else:
        out.print(f"plan: {counts}; nothing written ({result.seconds:.1f}s)")


def print_bundle(result) -> None:
    out = console()
    size = sum(f["bytes"] for f in result.files.values())
    typed = "" if result.precision == "fp32" else f", {result.precision} graphs with the routing in FP32"
    out.print(
        f"wrote [bold]{escape(str(result.path))}[/bold]: {len(result.files)} files, {size / 2**20:,.1f} MiB"
        f"{typed} ({result.seconds:.1f}s)"
    )
    counts = ", ".join(f"{n} {p}" for p, n in result.plugins.items()) or "no plugin nodes"
    out.print(f"  plugins: {counts}; {result.ptx_kernels} kernel variants as PTX for {', '.join(result.targets)}")
    for name, p in result.parity.items():
        decisions = p["routing_decisions"]
        routing = f"routing: {p['routing']}" if decisions is None else f"routing decisions {share(decisions)}"
        if p.get("routing_flips"):
            routing += f" ({p['routing_flips']} flips, all within the gates' rounding)"
        out.print(
            f"  {escape(name)} vs PyTorch ({p['backend']}, batch {p['batch']}): max rel err "
            f"{p['max_rel_err']:.2g}, {routing} {mark(p['passed'])}"
        )
    for layer in result.declined:
        out.print(f"[yellow]declined[/yellow] {escape(layer['layer'])}: {escape(layer['reason'])}")
    print_notes(result.notes)
    out.print(f"next, on the target: moe-export build engine {escape(str(result.path))}  (see its README.md)")


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
