"""moe-export: Vision MoE models from PyTorch to portable ONNX (and TensorRT), with routing-aware parity.

A thin click layer over the ``exporter`` library: options -> one library call -> a table. Heavy
modules (torch, onnx, onnxruntime) are imported inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import click

from exporter import settings
from exporter.errors import CheckFailed, UserError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # pipes and files: long lines rather than wrapped table cells
        console.width = 200
    return console


@contextmanager
def step(message: str):
    """Shows a spinner (or a start line when not on a terminal) and the time a step took."""
    err = _console(stderr=True)
    start = time.perf_counter()
    if err.is_terminal:
        with err.status(escape(message) + " ..."):
            yield
    else:
        err.print(f"... {escape(message)}")
        yield
    err.print(f"[green]✓[/green] {escape(message)} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


class _Cli(click.Group):
    """Turns library errors into one line on stderr and the documented exit codes."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_USAGE)
        except CheckFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            ctx.exit(EXIT_CHECK_FAILED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _write_json(dest: str, data) -> None:
    if dest == "-":
        click.echo(json.dumps(data, indent=2))
    else:
        from exporter.fileio import write_json

        write_json(dest, data)


def _emit(result, printer, json_out: str | None) -> None:
    """The human-readable report (unless JSON goes to stdout), then the JSON report if asked for."""
    if json_out != "-":
        printer(result)
    if json_out:
        _write_json(json_out, result.to_dict())


def model_options(f):
    """--model / --module / --input-shape / --checkpoint / --seed and the V-MoE routing overrides."""
    options = [
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
            help="Input images of a user module (e.g. 8,3,224,224); N is the example batch.",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(),
            help="Weights: .safetensors, a PyTorch state dict, or a vmoe checkpoint (PREFIX or PREFIX.index; "
            "alone, without --model, it describes the model too).",
        ),
        click.option("--seed", type=int, default=None, help="Seed of the random weights when there is no checkpoint."),
        click.option("--k", "k", type=int, help="V-MoE: experts per token (1 or 2 in the papers)."),
        click.option(
            "--capacity-factor", type=float, help="V-MoE: capacity factor C (e.g. 1.05; below 1 drops tokens)."
        ),
        click.option("--batch-priority/--no-batch-priority", default=None, help="V-MoE: Batch Prioritized Routing."),
        click.option("--group-images", type=int, help="V-MoE: images per routing group (8 in the papers, 1 for edge)."),
        click.option(
            "--bf16-dispatch/--no-bf16-dispatch",
            default=None,
            help="Round expert inputs and outputs to bfloat16 as the reference does (bit-matches vmoe's eval).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _source(
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch=None,
    default=None,
):
    from exporter import source as sources
    from exporter.checkpoints import is_vmoe_checkpoint

    shape = sources.parse_shape(input_shape) if input_shape else None
    overrides = dict(
        k=k,
        capacity_factor=capacity_factor,
        batch_priority=batch_priority,
        group_images=group_images,
        bf16_dispatch=bf16_dispatch,
    )
    if model and module:
        raise UserError("give either --model or --module, not both")
    if module:
        if any(v is not None for v in overrides.values()):
            raise UserError(
                "--k, --capacity-factor, --batch-priority, --group-images and --bf16-dispatch only apply to --model"
            )
        return sources.from_module(module, input_shape=shape, seed=_seed(seed), checkpoint=checkpoint)
    if model is None and default is not None and default.kind == "zoo":
        model = default.spec  # validate: start from the graph's own config, then apply overrides
        config = default.config.replace(**overrides)
        return sources.ModelSource(
            "zoo",
            model,
            config.input_shape,
            config,
            default.seed if seed is None else seed,
            *sources.checkpoint_info(checkpoint or default.checkpoint),
        )
    if model is None and default is not None:
        if any(v is not None for v in overrides.values()):
            raise UserError("--k, --capacity-factor, --batch-priority and --group-images only apply to zoo models")
        if checkpoint or seed is not None:
            return sources.from_module(
                default.spec,
                input_shape=default.input_shape,
                seed=_seed(seed),
                checkpoint=checkpoint or default.checkpoint,
            )
        return default
    if model is None and checkpoint:
        path = Path(checkpoint)
        weights_file = path.suffix in (".safetensors", ".pt", ".pth", ".bin")
        if is_vmoe_checkpoint(checkpoint) or path.is_dir() or not (path.exists() or weights_file):
            return sources.from_vmoe_checkpoint(checkpoint, seed=_seed(seed), **overrides)
        if not path.exists():
            raise UserError(f"checkpoint {checkpoint} does not exist")
        raise UserError(f"{checkpoint} holds weights only: give --model NAME or --module FILE.py:FACTORY with it")
    if model is None:
        raise UserError("give --model NAME (see `moe-export models`) or --module FILE.py:FACTORY")
    return sources.from_zoo(model, seed=_seed(seed), checkpoint=checkpoint, input_shape=shape, **overrides)


def _seed(seed):
    return settings.DEFAULT_SEED if seed is None else seed


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="moe-export")
def main():
    """Export Vision Mixture-of-Experts models (V-MoE, Soft-MoE) to portable ONNX and check parity,
    routing decisions included.

    \b
    Example:
      moe-export models
      moe-export export --model vmoe-s32-last2-e8 --routing-outputs -o vmoe.onnx
      moe-export validate vmoe.onnx
    """


@main.command()
@click.option("--json", "json_out", metavar="PATH", help="Also write the list as JSON ('-' for stdout).")
def models(json_out):
    """List the model zoo: name, family, parameters, summary.

    \b
    Example:
      moe-export models --json -
    """
    from rich.table import Table

    from exporter.zoo import ZOO, param_count

    rows = [(c.name, c.family, param_count(c), c.summary) for c in ZOO.values()]
    if json_out:
        _write_json(json_out, [dict(name=n, family=f, params=p, summary=s) for n, f, p, s in rows])
        if json_out == "-":
            return
    table = Table(box=None, pad_edge=False, show_header=False)  # one model name at the start of each line
    for col in ("model", "family", "params", "summary"):
        table.add_column(col, justify="right" if col == "params" else "left", no_wrap=col != "summary")
    for n, f, p, s in rows:
        table.add_row(n, f, f"{p / 1e6:,.1f}M", escape(s))
    _console().print(table)


@main.group("import")
def import_group():
    """Bring in models trained elsewhere: checkpoints of the reference implementation (vmoe)."""


@import_group.command("vmoe")
@click.argument("prefix", type=click.Path())
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="The model folder to write.")
@click.option("--name", help="Model name in config.json (default: the matching released config, else vmoe-checkpoint).")
@click.option("--k", "k", type=int, help="V-MoE: experts per token (default 2, as every released config).")
@click.option("--capacity-factor", type=float, help="V-MoE: capacity factor (default: the released config's eval C).")
@click.option("--batch-priority/--no-batch-priority", default=None, help="V-MoE: Batch Prioritized Routing (off).")
@click.option("--group-images", type=int, help="V-MoE: images per routing group (default 8, as the reference).")
@click.option(
    "--bf16-dispatch/--no-bf16-dispatch",
    default=None,
    help="Round expert inputs and outputs to bfloat16 as the reference does (default: float32).",
)
@click.option("--json", "json_out", metavar="PATH", help="Write the import report as JSON ('-' for stdout).")
def import_vmoe_command(
    prefix, output_dir, name, k, capacity_factor, batch_priority, group_images, bf16_dispatch, json_out
):
    """Convert a vmoe checkpoint (PREFIX.index + PREFIX.data-*) into DIR/model.safetensors and
    DIR/config.json. The architecture is read off the parameter tree; routing settings the
    checkpoint does not hold come from the matching released config or the reference's defaults.
    Every --model option then takes DIR; --checkpoint PREFIX also works without importing.

    \b
    Example:
      moe-export import vmoe gs-copy/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012 -o b16-384
      moe-export export --model b16-384 -o b16-384.onnx
    """
    from exporter.checkpoints import import_vmoe

    overrides = dict(
        k=k,
        capacity_factor=capacity_factor,
        batch_priority=batch_priority,
        group_images=group_images,
        bf16_dispatch=bf16_dispatch,
    )
    err = _console(stderr=True)
    with step(f"Importing {prefix}"):
        result = import_vmoe(
            prefix, output_dir, name=name, progress=lambda t: err.print(f"[dim]  {escape(t)}[/dim]"), **overrides
        )
    _emit(result, _print_import, json_out)


def _print_import(result) -> None:
    c, src = result.config, result.source
    layers = ",".join(map(str, c["moe_layers"]))
    routing = (
        f"k={c['k']}, C={c['capacity_factor']}, groups of {c['group_images']} images, "
        f"BPR {'on' if c['batch_priority'] else 'off'}"
        if c["family"] == "vmoe"
        else f"{c['slots_per_expert']} slot(s) per expert"
    )
    _console().print(
        f"{escape(result.output_dir)}: {c['name']} ({c['family']}), {c['image_size']} px, /{c['patch_size']}, "
        f"D={c['dim']}, {c['layers']} layers, MoE at {layers}, E={c['num_experts']}, {routing}, "
        f"dispatch {'bfloat16' if c['bf16_dispatch'] else 'float32'}; "
        f"{src['parameters'] / 1e6:,.1f}M parameters, sha256 {src['checkpoint_sha256'][:12]}"
    )


@main.command()
@model_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--opset", type=int, default=settings.DEFAULT_OPSET, show_default=True, help="ONNX opset (>= 18).")
@click.option("--routing-outputs", is_flag=True, help="Expose each V-MoE layer's routing as graph outputs.")
@click.option("--json", "json_out", metavar="PATH", help="Write an export report as JSON ('-' for stdout).")
def export(
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    output,
    opset,
    routing_outputs,
    json_out,
):
    """Export a model to a portable ONNX graph (standard ops only, dynamic batch).

    \b
    Examples:
      moe-export export --model vmoe-tiny --capacity-factor 0.5 --batch-priority --routing-outputs -o tiny.onnx
      moe-export export --module samples/01_user_module/my_vit.py:build --input-shape 8,3,32,32 -o my.onnx
    """
    from exporter.export import export_onnx
    from exporter.source import load

    src = _source(
        model, module, input_shape, checkpoint, seed, k, capacity_factor, batch_priority, group_images, bf16_dispatch
    )
    with step(f"Building {src.name}"):
        loaded = load(src)
    result = export_onnx(loaded, output, opset=opset, routing_outputs=routing_outputs, step=step)
    _emit(result, _print_export, json_out)


def _print_export(result) -> None:
    out = _console()
    size = sum(p.stat().st_size for p in result.path.parent.glob(result.path.name + "*"))
    out.print(
        f"wrote [bold]{escape(str(result.path))}[/bold] ({size / 2**20:,.1f} MiB, opset {result.opset}, "
        f"{sum(result.op_counts.values())} nodes, export {result.seconds:.1f}s)"
    )
    for name, (dtype, dims) in {**result.inputs, **result.outputs}.items():
        kind = "input " if name in result.inputs else "output"
        out.print(escape(f"  {kind} {name}: {dtype}[{', '.join(map(str, dims))}]"))
    if not result.dynamic_batch:
        out.print("[yellow]warning:[/yellow] the model fixes its batch size, so the graph has a static batch")
    if result.findings:
        out.print(f"[yellow]warning:[/yellow] {len(result.findings)} TensorRT portability findings:")
        for f in result.findings[:20]:
            out.print(escape(f"  - {f}"))
    else:
        out.print("portable: standard ONNX ops only, none of the TensorRT hazards")


@main.command()
@click.argument("graph", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The plugin .onnx file to write.")
@click.option("--plan-only", is_flag=True, help="Find and check the MoE layers, print the plan, write nothing.")
@click.option("--seed", type=int, default=settings.DEFAULT_SEED, show_default=True, help="Seed of the probe images.")
@click.option("--json", "json_out", metavar="PATH", help="Write the rewrite report as JSON ('-' for stdout).")
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
    from exporter.rewrite import rewrite_onnx

    if not plan_only and not output:
        raise UserError("give -o OUT.onnx, or --plan-only to write nothing")
    result = rewrite_onnx(graph, None if plan_only else output, plan_only=plan_only, seed=seed, step=step)
    _emit(result, _print_rewrite, json_out)


def _print_rewrite(result) -> None:
    from rich.table import Table

    out = _console()
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


@main.command()
@click.argument("graph", type=click.Path())
@model_options
@click.option("--onnx", "engine_graph", type=click.Path(dir_okay=False), help="Engine files: the graph it came from.")
@click.option("--batch", type=int, help="Images per run (a multiple of the routing group). Default: one group.")
@click.option("--inputs", "inputs_npz", type=click.Path(dir_okay=False), help="A .npz with the input images.")
@click.option("--input-seed", type=int, default=settings.DEFAULT_SEED, show_default=True, help="Seed of random inputs.")
@click.option(
    "--rtol",
    type=float,
    default=settings.FP32_TOLERANCES.rtol,
    show_default=True,
    help="Max |actual-expected| / max|expected| per output.",
)
@click.option(
    "--min-routing-agreement",
    type=float,
    default=settings.FP32_TOLERANCES.routing_agreement,
    show_default=True,
    help="Smallest share of (token, choice) pairs with identical routing, per layer.",
)
@click.option("--json", "json_out", metavar="PATH", help="Write the parity report as JSON ('-' for stdout).")
def validate(
    graph,
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    engine_graph,
    batch,
    inputs_npz,
    input_seed,
    rtol,
    min_routing_agreement,
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
      moe-export validate vmoe-bundle
      moe-export validate model.engine --onnx model.plugins.onnx --batch 16
    """
    from exporter.parity import source_of, validate_onnx
    from exporter.runners import read_onnx_header

    ctx = click.get_current_context()
    if Path(graph).is_dir() or Path(graph).suffix in (".engine", ".plan"):
        from exporter.bundle import resolve_engine
        from exporter.parity import validate_engine

        engine, onnx_graph, sample, precision = resolve_engine(graph, engine_graph)
        header = read_onnx_header(onnx_graph)
        recorded = None if (model or module) else source_of(onnx_graph, header, None)
        src = _source(
            model,
            module,
            input_shape,
            checkpoint,
            seed,
            k,
            capacity_factor,
            batch_priority,
            group_images,
            bf16_dispatch,
            recorded,
        )
        tolerances = settings.TOLERANCES.get(precision or "fp32", settings.FP32_TOLERANCES)
        default = click.core.ParameterSource.DEFAULT
        tolerances = settings.Tolerances(
            rtol=tolerances.rtol if ctx.get_parameter_source("rtol") == default else rtol,
            routing_agreement=tolerances.routing_agreement
            if ctx.get_parameter_source("min_routing_agreement") == default
            else min_routing_agreement,
        )
        use_sample = sample is not None and batch is None and inputs_npz is None
        model_given = model or module or input_shape or checkpoint or seed is not None
        routing_given = any(v is not None for v in (k, capacity_factor, batch_priority, group_images, bf16_dispatch))
        reference = None
        if use_sample and not (model_given or routing_given):  # the bundle's PyTorch outputs: no model needed
            from exporter.bundle import stored_reference

            reference = stored_reference(sample.parent)
        report = validate_engine(
            engine,
            onnx_graph,
            src,
            batch=batch,
            seed=input_seed,
            inputs_npz=str(sample) if use_sample else inputs_npz,
            tolerances=tolerances,
            step=step,
            reference=reference,
        )
        _emit(report, _print_report, json_out)
        if not report.passed:
            raise CheckFailed(f"{report.graph} does not match {report.model} (see the table above)")
        return
    if engine_graph:
        raise UserError("--onnx applies to engine files; GRAPH is already an ONNX graph")
    header = read_onnx_header(graph)
    recorded = None if (model or module) else source_of(graph, header, None)
    src = _source(
        model,
        module,
        input_shape,
        checkpoint,
        seed,
        k,
        capacity_factor,
        batch_priority,
        group_images,
        bf16_dispatch,
        default=recorded,
    )
    tolerances = settings.Tolerances(rtol=rtol, routing_agreement=min_routing_agreement)
    report = validate_onnx(
        graph,
        src,
        batch=batch,
        seed=input_seed,
        inputs_npz=inputs_npz,
        tolerances=tolerances,
        step=step,
        header=header,
    )
    _emit(report, _print_report, json_out)
    if not report.passed:
        raise CheckFailed(f"{report.graph} does not match {report.model} (see the table above)")


def _share(x: float) -> str:
    """A percentage that never rounds a shortfall up to 100%."""
    return "100%" if x == 1.0 else f"{math.floor(x * 1e4) / 1e2:.2f}%"


def _mark(ok: bool) -> str:
    return "[green]pass[/green]" if ok else "[red]FAIL[/red]"


def _print_report(report) -> None:
    from rich.table import Table

    out = _console()
    out.print(
        f"[bold]{escape(report.graph)}[/bold] vs PyTorch {escape(report.model)} "
        f"on {report.backend}, batch {report.batch}"
    )
    t = Table(title="outputs", title_justify="left", box=None, pad_edge=False)
    for col in ("output", "shape", "max abs err", "max rel err", f"rel tol {report.tolerances['rtol']:g}"):
        t.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for o in report.outputs:
        t.add_row(escape(o.name), "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", _mark(o.passed))
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
                _share(r.expert),
                _share(r.kept),
                _share(r.slot),
                _share(r.agreement),
                str(r.slot_swaps),
                f"{r.dropped_expected:.1%} / {r.dropped_actual:.1%}",
                _mark(r.passed),
            )
        out.print(t)
    else:
        out.print(f"routing: {report.routing_status}")
    if any(r.slot_swaps for r in report.routing):
        out.print(
            "[yellow]note:[/yellow] slot swaps: tokens with the same expert and kept decision took each other's "
            "buffer slots (tied priorities ordered differently); outputs are unaffected"
        )
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    out.print(f"{_mark(report.passed)} ({report.seconds:.1f}s)")


@main.command()
@click.option(
    "-o",
    "--output-dir",
    default="moe-export-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write the graphs and reports.",
)
def demo(output_dir):
    """The main job on built-in defaults: export and validate a small V-MoE (Batch Prioritized Routing,
    capacity factor 0.5, so tokens are dropped) and a small Soft-MoE, then rewrite both into plugin
    graphs and validate those too, on CPU.

    \b
    Example:
      moe-export demo -o out/
    """
    from exporter.export import export_onnx
    from exporter.parity import validate_onnx
    from exporter.rewrite import rewrite_onnx
    from exporter.source import from_zoo, load

    runs = [
        ("vmoe-tiny", dict(capacity_factor=0.5, batch_priority=True)),
        ("soft-moe-tiny", {}),
    ]
    failed = []
    for name, overrides in runs:
        _console().rule(f"{name} {' '.join(f'{k}={v}' for k, v in overrides.items())}")
        src = from_zoo(name, **overrides)
        with step(f"Building {name}"):
            loaded = load(src)
        path = Path(output_dir) / f"{name}.onnx"
        result = export_onnx(loaded, path, routing_outputs=True, step=step)
        _print_export(result)
        report = validate_onnx(path, src, step=step)
        _print_report(report)
        _write_json(Path(output_dir) / f"{name}.parity.json", report.to_dict())
        plugin_path = Path(output_dir) / f"{name}.plugins.onnx"
        rewritten = rewrite_onnx(path, plugin_path, step=step)
        _print_rewrite(rewritten)
        plugin_report = validate_onnx(plugin_path, src, step=step)
        _print_report(plugin_report)
        _write_json(Path(output_dir) / f"{name}.plugins.parity.json", plugin_report.to_dict())
        if not report.passed or not plugin_report.passed or rewritten.declined:
            failed.append(name)
    if failed:
        raise CheckFailed(f"parity or rewrite failed for {', '.join(failed)}")
    _console().print(f"all passed; graphs and reports in [bold]{escape(str(output_dir))}[/bold]")


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a comma-separated list of numbers like 0.5,1,2") from None
    if not values:
        raise UserError(f"{option} needs at least one value")
    return values


def _cell(value) -> str:
    """A table cell: shares (floats up to 1) as percentages, other floats to 3 digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1%}" if value <= 1 else f"{value:.3g}"
    return str(value)


@main.group("inspect")
def inspect_group():
    """Look inside a model: pictures of its routing."""


@inspect_group.command("routing")
@model_options
@click.option("--image", type=click.Path(dir_okay=False), help="A PNG or JPEG, resized to the model's input.")
@click.option("--sample", type=int, help="An image of the digits test split instead (default: sample 0).")
@click.option(
    "--capacity-factors",
    "factors",
    default=",".join(f"{c:g}" for c in settings.INSPECT_CAPACITY_FACTORS),
    show_default=True,
    help="V-MoE: one column per factor, each vanilla and BPR; the image is routed in a group of its own.",
)
@click.option("--onnx", "graph", type=click.Path(dir_okay=False), help="V-MoE: picture this graph's routing outputs.")
@click.option("--slots", help="Soft-MoE: slots to picture, e.g. 0,5,9 (default: the most concentrated).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@click.option("--json", "json_out", metavar="PATH", help="Write the per-panel numbers as JSON ('-' for stdout).")
def inspect_routing(
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    image,
    sample,
    factors,
    graph,
    slots,
    output,
    json_out,
):
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
    from exporter.inspect_routing import inspect_routing as draw

    recorded = None
    if graph and not (model or module):
        from exporter.parity import source_of
        from exporter.runners import read_onnx_header

        recorded = source_of(graph, read_onnx_header(graph), None)
    src = _source(
        model,
        module,
        input_shape,
        checkpoint,
        seed,
        k,
        capacity_factor,
        batch_priority,
        group_images,
        bf16_dispatch,
        default=recorded,
    )
    slot_list = [int(s) for s in _floats(slots, "--slots")] if slots else None
    picture = draw(
        src,
        output,
        image=image,
        sample=sample,
        capacity_factors=_floats(factors, "--capacity-factors"),
        graph=graph,
        slots=slot_list,
        step=step,
    )
    if json_out != "-":
        from rich.table import Table

        out = _console()
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
        for note in picture.notes:
            out.print(f"[yellow]note:[/yellow] {escape(note)}")
    if json_out:
        _write_json(json_out, picture.to_dict())


def _parity_cell(parity: dict) -> str:
    if parity["status"] == "slots differ":
        return f"[yellow]slots differ[/yellow] ({parity['pairs_differing']} pairs)"
    return _mark(parity["passed"])


@main.group("sweep")
def sweep_group():
    """Sweep a routing setting and measure what it costs."""


@sweep_group.command("capacity")
@model_options
@click.option(
    "--factors",
    default=",".join(f"{c:g}" for c in settings.SWEEP_CAPACITY_FACTORS),
    show_default=True,
    help="Capacity factors, each run vanilla and with Batch Prioritized Routing.",
)
@click.option("--parity/--no-parity", default=True, show_default=True, help="Export and check the graph at each point.")
@click.option("--images", type=int, help="Digits test images to route (default: all 448), in whole routing groups.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="A PNG plot of the sweep.")
@click.option("--json", "json_out", metavar="PATH", help="Write the sweep as JSON ('-' for stdout).")
def sweep_capacity(
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    factors,
    parity,
    images,
    output,
    json_out,
):
    """V-MoE: dropped share, output deviation from unlimited capacity, digits test accuracy and exported
    graph parity, per capacity factor, vanilla vs Batch Prioritized Routing. Exit 1 if parity fails.

    \b
    Example:
      moe-export sweep capacity --model vmoe-tiny --checkpoint samples/02_digits/vmoe_digits.safetensors -o sweep.png
    """
    from exporter.sweep import plot_sweep
    from exporter.sweep import sweep_capacity as run_sweep

    if capacity_factor is not None or batch_priority is not None:
        raise UserError("the sweep sets --capacity-factor and --batch-priority itself; use --factors")
    src = _source(model, module, input_shape, checkpoint, seed, k, None, None, group_images, bf16_dispatch)
    report = run_sweep(src, capacity_factors=_floats(factors, "--factors"), parity=parity, images=images, step=step)
    if output:
        plot_sweep(report, output)
    if json_out != "-":
        from rich.table import Table

        out = _console()
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
        for note in report.notes:
            out.print(f"[yellow]note:[/yellow] {escape(note)}")
        if output:
            out.print(f"wrote [bold]{escape(output)}[/bold]")
    if json_out:
        _write_json(json_out, report.to_dict())
    if not report.parity_passed:
        raise CheckFailed("the exported graph does not match PyTorch at some capacity factors (see the table)")


# --- bench ---------------------------------------------------------------------------------------


@main.command()
@model_options
@click.option("--batch", type=int, help="Images per run (a multiple of the routing group). Default: one group, or 8.")
@click.option("--warmup", type=int, default=settings.BENCH_WARMUP, show_default=True, help="Untimed runs first.")
@click.option("--runs", type=int, default=settings.BENCH_RUNS, show_default=True, help="Timed runs per backend.")
@click.option(
    "--backends",
    default="all",
    show_default=True,
    help="Comma-separated: torch-eager, torch-compile, onnxruntime-cpu, onnxruntime-cuda, tensorrt, tensorrt-plugins.",
)
@click.option("--threads", type=int, help="PyTorch and ONNX Runtime intra-op threads. Default: every CPU core.")
@click.option("--json", "json_out", metavar="PATH", help="Write the rows as JSON ('-' for stdout).")
def bench(
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    batch,
    warmup,
    runs,
    backends,
    threads,
    json_out,
):
    """Latency and throughput of one model on every backend this machine has: PyTorch eager,
    torch.compile, ONNX Runtime (CPU, CUDA) and TensorRT engines of the portable and the plugin graph.

    Median and p90 of the timed runs, images/s at the median, setup time (compile, export, engine
    build) and the max relative error of each backend's output against eager. Backends the machine
    lacks are listed as skipped with the reason; torch.compile is slow to compile on CPU (leave it
    out with --backends).

    \b
    Examples:
      moe-export bench --model vmoe-s32-last2-e8 --batch 8
      moe-export bench --model soft-moe-tiny --backends torch-eager,onnxruntime-cpu --runs 20 --json -
    """
    from exporter.bench import bench as run_bench
    from exporter.bench import parse_backends

    names = parse_backends(backends)
    src = _source(
        model, module, input_shape, checkpoint, seed, k, capacity_factor, batch_priority, group_images, bf16_dispatch
    )
    report = run_bench(src, batch=batch, warmup=warmup, runs=runs, backends=names, threads=threads, step=step)
    _emit(report, _print_bench, json_out)


def _print_bench(report) -> None:
    from rich.table import Table

    out = _console()
    m = report.machine
    out.print(
        f"[bold]{escape(report.model)}[/bold], batch {report.batch}, {report.warmup} warm-up + {report.runs} timed "
        f"runs; {escape(m['cpu'])}, {escape(m['gpu'] or 'no GPU')}; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}, TensorRT {m['tensorrt'] or '-'}; {report.threads} threads"
    )

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    table = Table(box=None, pad_edge=False)
    for col in ("backend", "device", "batch", "median ms", "p90 ms", "images/s", "setup s", "max rel err", "note"):
        table.add_column(col, justify="left" if col in ("backend", "device", "note") else "right")
    for r in report.rows:
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        table.add_row(
            r.backend,
            r.device,
            str(r.batch),
            num(r.median_ms, ".2f"),
            num(r.p90_ms, ".2f"),
            num(r.images_per_s, ",.1f"),
            num(r.setup_s, ".1f"),
            num(r.max_rel_err, ".1e"),
            escape(note),
        )
    out.print(table)
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")


# --- build: deploy bundles and TensorRT engines ----------------------------------------------------


def _target_list(text: str) -> list[str]:
    targets = [t for t in text.replace(" ", "").split(",") if t]
    if not targets:
        raise UserError("--target needs at least one architecture, e.g. sm_87,sm_90")
    return targets


def _default_targets() -> str:
    from plugins.aot import target_unsupported

    return ",".join(f"sm_{a}" for a in settings.DEFAULT_PTX_TARGETS if target_unsupported(a) is None or a < 100)


@main.group("build")
def build_group():
    """Make what a GPU needs: a deploy bundle (on CPU) and a TensorRT engine (TensorRT + GPU)."""


@build_group.command("bundle")
@model_options
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False), help="The bundle folder.")
@click.option(
    "--target",
    "targets",
    default=_default_targets(),
    show_default=True,
    help="CUDA architectures to precompile the plugin kernels for (sm_87 Jetson Orin, sm_90 H100/H200, "
    "sm_110 Jetson Thor with Triton >= 3.9).",
)
@click.option("--batch", type=int, help="Sample images (a multiple of the routing group). Default: one group.")
@click.option("--input-seed", type=int, default=settings.DEFAULT_SEED, show_default=True, help="Seed of the samples.")
@click.option("--json", "json_out", metavar="PATH", help="Write the bundle report as JSON ('-' for stdout).")
def build_bundle_command(
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    output_dir,
    targets,
    batch,
    input_seed,
    json_out,
):
    """Model -> portable ONNX -> plugin ONNX -> CPU parity -> a deploy folder for an edge GPU.

    The folder holds both graphs, the plugin package with its kernels precompiled to PTX, sample inputs
    and PyTorch's outputs (.npz and Polygraphy JSON), manifest.json (hashes, I/O, tolerances, versions)
    and a README with the commands to build and check the engine on the target. CPU only.

    \b
    Examples:
      moe-export build bundle --model vmoe-s32-last2-e8 -o vmoe-bundle
      moe-export build bundle --model soft-moe-tiny --target sm_87 -o soft-bundle --json -
    """
    from exporter.bundle import build_bundle

    src = _source(
        model, module, input_shape, checkpoint, seed, k, capacity_factor, batch_priority, group_images, bf16_dispatch
    )
    result = build_bundle(src, output_dir, targets=_target_list(targets), batch=batch, seed=input_seed, step=step)
    _emit(result, _print_bundle, json_out)


def _print_bundle(result) -> None:
    out = _console()
    size = sum(f["bytes"] for f in result.files.values())
    out.print(
        f"wrote [bold]{escape(str(result.path))}[/bold]: {len(result.files)} files, {size / 2**20:,.1f} MiB "
        f"({result.seconds:.1f}s)"
    )
    counts = ", ".join(f"{n} {p}" for p, n in result.plugins.items()) or "no plugin nodes"
    out.print(f"  plugins: {counts}; {result.ptx_kernels} kernel variants as PTX for {', '.join(result.targets)}")
    for name, p in result.parity.items():
        decisions = p["routing_decisions"]
        routing = f"routing: {p['routing']}" if decisions is None else f"routing decisions {_share(decisions)}"
        out.print(
            f"  {escape(name)} vs PyTorch ({p['backend']}, batch {p['batch']}): max rel err "
            f"{p['max_rel_err']:.2g}, {routing} {_mark(p['passed'])}"
        )
    for layer in result.declined:
        out.print(f"[yellow]declined[/yellow] {escape(layer['layer'])}: {escape(layer['reason'])}")
    for note in result.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")
    out.print(f"next, on the target: moe-export build engine {escape(str(result.path))}  (see its README.md)")


def _progress():
    """Prints each TensorRT build phase once, when it starts."""
    err = _console(stderr=True)
    seen = set()

    def report(text: str) -> None:
        phase = text.rsplit(" (", 1)[0]
        if phase not in seen:
            seen.add(phase)
            err.print(f"[dim]  {escape(text)}[/dim]")

    return report


@build_group.command("engine")
@click.argument("source_path", required=False, type=click.Path(exists=True))
@model_options
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False),
    help="The bundle folder (written first for --model/--module; default: SOURCE when it is a bundle).",
)
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="FP32, TF32 off (default; exact parity).")
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 with the router and routing math in FP32.")
@click.option("--bf16", "precision", flag_value="bf16", help="BF16 with the router and routing math in FP32.")
@click.option("--min-batch", type=int, help="Smallest batch of the optimization profile (default: one group).")
@click.option("--opt-batch", type=int, help="Batch TensorRT optimizes for (default: the max batch).")
@click.option("--max-batch", type=int, help="Largest batch of the optimization profile (default: the opt batch).")
@click.option("--workspace", "workspace_mib", type=int, metavar="MIB", help="Workspace memory pool limit in MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file, read and updated.")
@click.option("--builder-optimization-level", "opt_level", type=click.IntRange(0, 5), help="0-5 (TensorRT: 3).")
@click.option("--portable", is_flag=True, help="Build from the portable graph (no plugins).")
@click.option("--target", "targets", default=_default_targets(), show_default=True, help="PTX targets of the bundle.")
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False),
    help="Also write a Triton Inference Server model-repository entry (model.plan + config.pbtxt).",
)
@click.option("--json", "json_out", metavar="PATH", help="Write the build and parity report as JSON ('-' for stdout).")
def build_engine_command(
    source_path,
    model,
    module,
    input_shape,
    checkpoint,
    seed,
    k,
    capacity_factor,
    batch_priority,
    group_images,
    bf16_dispatch,
    output_dir,
    precision,
    min_batch,
    opt_batch,
    max_batch,
    workspace_mib,
    timing_cache,
    opt_level,
    portable,
    targets,
    triton_repo,
    json_out,
):
    """Build a TensorRT engine and check it against PyTorch, routing decisions included.

    From a zoo model or user module (the deploy bundle is written first, on CPU), a bundle, or an
    exported .onnx (the engine goes to -o DIR, validated against the model the graph records).
    Registers the moe:: plugins (AOT, precompiled PTX from the bundle), builds model.engine in the
    bundle, checks with the engine inspector that every plugin node became a plugin layer, and
    validates the engine on the bundle's sample inputs. Exit 0 on parity, 1 when parity fails, 2 on bad
    input or without TensorRT (the bundle is kept).

    \b
    Examples:
      moe-export build engine --model vmoe-s32-last2-e8 -o vmoe-bundle
      moe-export build engine vmoe-bundle --fp16 --max-batch 32 --timing-cache trt.cache
      moe-export build engine vmoe-bundle --triton-repo model_repository
    """
    import shutil

    from exporter.bundle import build_bundle, build_bundle_engine, build_onnx_engine, is_bundle, triton_entry
    from exporter.engine import EngineOptions, TensorRTUnavailable

    options = EngineOptions(precision, min_batch, opt_batch, max_batch, workspace_mib, timing_cache, opt_level)
    options.check()
    if triton_repo and source_path and not is_bundle(source_path):
        raise UserError("--triton-repo needs a bundle (its manifest names the inputs and outputs)")
    if model or module:
        if source_path:
            raise UserError("give a bundle folder or --model/--module, not both")
        if not output_dir:
            raise UserError("give -o DIR: the bundle folder to write")
        src = _source(
            model,
            module,
            input_shape,
            checkpoint,
            seed,
            k,
            capacity_factor,
            batch_priority,
            group_images,
            bf16_dispatch,
        )
        result = build_bundle(src, output_dir, targets=_target_list(targets), step=step)
        _print_bundle(result)
        bundle = Path(output_dir)
    elif source_path and is_bundle(source_path):
        bundle = Path(source_path)
        if output_dir and Path(output_dir).resolve() != bundle.resolve():
            if Path(output_dir).exists():
                raise UserError(f"{output_dir} exists; -o must be a new folder for a copy of {bundle}")
            shutil.copytree(bundle, output_dir)
            bundle = Path(output_dir)
    elif source_path and Path(source_path).suffix == ".onnx":
        bundle = None
        if not output_dir:
            raise UserError("give -o DIR: the folder for the engine")
    elif source_path:
        raise UserError(f"{source_path} is neither a moe-export bundle nor an .onnx file")
    else:
        raise UserError("give a bundle folder, or --model NAME / --module FILE.py:FACTORY with -o DIR")
    if bundle is None:
        built = build_onnx_engine(source_path, output_dir, options, step=step, progress=_progress())
    else:
        try:
            built = build_bundle_engine(bundle, options, portable=portable, step=step, progress=_progress())
        except TensorRTUnavailable as e:
            raise TensorRTUnavailable(
                f"{e}. The bundle in {bundle} is complete: build its engine on the target"
            ) from None
    entry = None
    if triton_repo and built.passed:  # never serve an engine that failed parity
        entry = triton_entry(bundle, triton_repo, max_batch=built.build.batch["max"])
    if json_out != "-":
        out = _console()
        b = built.build
        plugins = ", ".join(f"{n} {op}" for op, n in b.plugin_layers.items()) or "none"
        out.print(
            f"wrote [bold]{escape(str(b.path))}[/bold] ({b.size_bytes / 2**20:,.1f} MiB, TensorRT {b.tensorrt}, "
            f"{b.precision}, batch {b.batch['min']}-{b.batch['max']}, {b.layers} layers; plugin layers: {plugins}; "
            f"{b.seconds:.1f}s)"
        )
        for note in b.notes:
            out.print(f"[yellow]note:[/yellow] {escape(note)}")
        _print_report(built.parity)
        if entry is not None:
            out.print(f"wrote Triton Inference Server entry [bold]{escape(str(entry.path))}[/bold]")
            for note in entry.notes:
                out.print(f"[yellow]note:[/yellow] {escape(note)}")
    if json_out:
        data = built.to_dict()
        data["triton"] = entry.to_dict() if entry is not None else None
        _write_json(json_out, data)
    if not built.passed:
        raise CheckFailed(f"the engine in {bundle} does not match PyTorch (see the table above)")


if __name__ == "__main__":
    sys.exit(main())
