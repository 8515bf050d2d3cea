"""``moe-export build bundle`` and ``build engine``: what a GPU needs."""

from __future__ import annotations

import click

from exporter import settings
from exporter.commands.console import console, emit, escape
from exporter.commands.options import (
    COUNT,
    SEED,
    folder_option,
    json_option,
    model_options,
    output_option,
    target_list,
    trust_option,
    verify_key_option,
)
from exporter.commands.render import print_bundle, print_notes, print_report
from exporter.errors import CheckFailed, UserError

BACKENDS = ("tensorrt", "tensorrt-rtx")

TARGETS_HELP = (
    "CUDA architectures to precompile the plugin kernels for (sm_87 Jetson Orin, sm_90 H100/H200, "
    "sm_110 Jetson Thor with Triton >= 3.9). Default: "
    + ",".join(f"sm_{a}" for a in settings.DEFAULT_PTX_TARGETS)
    + ", less those the installed Triton cannot compile."
)


@click.group("build")
def build_group():
    """Make what a GPU needs: a deploy bundle (on CPU) and a TensorRT engine (TensorRT + GPU)."""


@build_group.command("bundle")
@model_options
@folder_option("-o", "--output-dir", required=True, help="The bundle folder.")
@click.option("--target", "targets", metavar="SM_XX,...", help=TARGETS_HELP)
@click.option("--batch", type=COUNT, help="Sample images (a multiple of the routing group). Default: one group.")
@click.option("--input-seed", type=SEED, default=settings.DEFAULT_SEED, show_default=True, help="Seed of the samples.")
@click.option(
    "--precision",
    type=click.Choice(settings.PRECISIONS),
    default=settings.DEFAULT_PRECISION.value,
    show_default=True,
    help="Both graphs in this type with the routing in FP32 (fp16 for Jetson); the engine builds strongly typed.",
)
@click.option(
    "--sign-key",
    metavar="PRIVATE_KEY",
    type=click.Path(dir_okay=False),
    help="Sign the manifest with this Ed25519 private key (PEM; moe-export keygen): the target checks it with "
    "--verify-key.",
)
@json_option("the bundle report")
def build_bundle(choice, output_dir, targets, batch, input_seed, precision, sign_key, json_out):
    """Model -> portable ONNX -> plugin ONNX -> CPU parity -> a deploy folder for an edge GPU.

    The folder holds both graphs, the plugin package with its kernels precompiled to PTX, sample inputs
    and PyTorch's outputs (.npz and Polygraphy JSON), manifest.json (hashes, I/O, tolerances, versions)
    and a README with the commands to build and check the engine on the target. CPU only.

    \b
    Examples:
      moe-export build bundle --model vmoe-s32-last2-e8 -o vmoe-bundle
      moe-export build bundle --model soft-moe-tiny --target sm_87 -o soft-bundle --json -
      moe-export build bundle --model vmoe-s32-last2-e8 --precision fp16 --target sm_87 -o vmoe-orin
      moe-export build bundle --model vmoe-tiny --sign-key signing.key -o tiny-bundle
    """
    from exporter.commands.choice import resolve
    from exporter.deploy.bundle import ParityFailed
    from exporter.deploy.bundle import build_bundle as run_build

    targets = target_list(targets) if targets is not None else None
    try:
        result = run_build(
            resolve(choice),
            output_dir,
            targets=targets,
            batch=batch,
            seed=input_seed,
            precision=precision,
            sign_key=sign_key,
        )
    except ParityFailed as failed:  # the tables that made it fail, then the one line
        if json_out != "-":
            for report in failed.reports.values():
                print_report(report)
        raise
    emit(result, print_bundle, json_out)


@build_group.command("engine")
@click.argument("source_path", required=False, type=click.Path(exists=True))
@model_options
@folder_option(
    "-o",
    "--output-dir",
    help="The bundle folder (written first for --model/--module; default: SOURCE when it is a bundle).",
)
@click.option(
    "--precision",
    type=click.Choice(settings.PRECISIONS),
    help="The precision of the bundle written first (default fp32). A bundle or graph builds in its own "
    "precision, strongly typed (export/build bundle --precision); naming another is refused.",
)
@click.option("--min-batch", type=COUNT, help="Smallest batch of the optimization profile. Default: one routing group.")
@click.option(
    "--opt-batch",
    type=COUNT,
    help="Batch TensorRT optimizes for. Default: --max-batch if given, else the bundle's sample batch "
    "(for an .onnx: --min-batch, else one routing group).",
)
@click.option(
    "--max-batch",
    type=COUNT,
    help="Largest batch of the optimization profile. Default: --opt-batch if given, else the bundle's sample "
    "batch (for an .onnx: --min-batch, else one routing group).",
)
@click.option("--workspace", "workspace_mib", type=COUNT, metavar="MIB", help="Workspace memory pool limit in MiB.")
@output_option("--timing-cache", help="Timing cache file, read and updated.")
@click.option("--builder-optimization-level", "opt_level", type=click.IntRange(0, 5), help="0-5 (TensorRT: 3).")
@click.option("--portable", is_flag=True, help="Build from the portable graph (no plugins).")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=BACKENDS[0],
    show_default=True,
    help="tensorrt: TensorRT on the GPU at hand. tensorrt-rtx: TensorRT for RTX, one engine per --target "
    "(RTX GPUs: sm_75, sm_80, sm_86, sm_89, sm_120, sm_121), built on any machine; run where a GPU of the target is.",
)
@click.option(
    "--target",
    "targets",
    metavar="SM_XX,...",
    help="PTX targets of the bundle written first; with --backend tensorrt-rtx also the engines' targets. "
    + TARGETS_HELP,
)
@folder_option(
    "--triton-repo",
    help="Also write a Triton Inference Server model-repository entry (model.plan + config.pbtxt).",
)
@verify_key_option
@trust_option
@json_option("the build and parity report")
def build_engine(
    source_path,
    choice,
    output_dir,
    precision,
    portable,
    backend,
    targets,
    triton_repo,
    verify_key,
    trust_module,
    json_out,
    **profile,
):
    """Build a TensorRT engine and check it against PyTorch, routing decisions included.

    From a zoo model or user module (the deploy bundle is written first, on CPU), a bundle, or an
    exported .onnx (the engine goes to -o DIR, validated against the model the graph records).
    Registers the moe:: plugins (AOT, precompiled PTX from the bundle), builds model.engine in the
    bundle, checks with the engine inspector that every plugin node became a plugin layer, and
    validates the engine on the bundle's sample inputs. Exit 0 on parity, 1 when parity fails, 2 on bad
    input or without TensorRT (the bundle is kept). With --backend tensorrt-rtx: one TensorRT for RTX
    engine per --target into the bundle and its manifest, built on any machine (no GPU needed), run
    against PyTorch where a GPU of its target is; otherwise built, not run (exit 0, the last line says so).

    \b
    Examples:
      moe-export build engine --model vmoe-s32-last2-e8 -o vmoe-bundle
      moe-export build engine --model vmoe-s32-last2-e8 --precision fp16 -o vmoe-fp16-bundle
      moe-export build engine vmoe-fp16-bundle --max-batch 32 --timing-cache trt.cache
      moe-export build engine vmoe-bundle --triton-repo model_repository
      moe-export build engine --model vmoe-tiny --backend tensorrt-rtx --target sm_89,sm_120 -o tiny-rtx
    """
    targets = _checked_targets(backend, targets)
    from exporter.backends.tensorrt import EngineOptions
    from exporter.deploy.engines import build_engine_for

    options = EngineOptions(precision=precision, **profile)
    request = dict(options=options, targets=targets, backend=backend, triton_repo=triton_repo, verify_key=verify_key)
    written = None
    if choice.model or choice.module:  # the bundle first, shown before the engine (kept if TensorRT is absent)
        written = _bundle_first(choice, source_path, output_dir, precision, json_out, request)
        source_path = output_dir
    elif not source_path:
        raise UserError("give a bundle folder, or --model NAME / --module FILE.py:FACTORY with -o DIR")
    run = build_engine_for(source_path, output_dir=output_dir, portable=portable, trust_module=trust_module, **request)
    run.bundle = written if written is not None else run.bundle
    emit(run, _print_engine if backend == "tensorrt" else _print_rtx, json_out)
    if not run.passed:
        where = run.built.bundle if backend == "tensorrt" else run.folder
        raise CheckFailed(f"the engine in {where} does not match PyTorch (see the table above)")


def _bundle_first(choice, source_path, output_dir, precision, json_out, request: dict):
    """``build engine --model/--module``: the request checked, then the bundle written and shown."""
    if source_path:
        raise UserError("give a bundle folder or --model/--module, not both")
    if not output_dir:
        raise UserError("give -o DIR: the bundle folder to write")
    from exporter.commands.choice import resolve
    from exporter.deploy.bundle import build_bundle as write_bundle
    from exporter.deploy.engines import check_engine_request

    model = resolve(choice)
    check_engine_request(model, output_dir=output_dir, **request)
    precision = precision or settings.DEFAULT_PRECISION
    written = write_bundle(model, output_dir, targets=request["targets"], precision=precision)
    if json_out != "-":
        print_bundle(written)
    return written


def _checked_targets(backend: str, targets: str | None) -> list | None:
    """The targets, refused in one line before the heavy imports where the backend cannot build them."""
    targets = target_list(targets) if targets is not None else None
    if backend == "tensorrt-rtx":
        from exporter.backends.tensorrt_rtx import check_targets

        check_targets(targets)
    return targets


def _print_engine(run) -> None:
    out = console()
    b = run.built.build
    plugins = ", ".join(f"{n} {op}" for op, n in b.plugin_layers.items()) or "none"
    out.print(
        f"wrote [bold]{escape(str(b.path))}[/bold] ({b.size_bytes / 2**20:,.1f} MiB, TensorRT {b.tensorrt}, "
        f"{b.precision}, batch {b.batch['min']}-{b.batch['max']}, {b.layers} layers; plugin layers: {plugins}; "
        f"{b.seconds:.1f}s)"
    )
    print_notes(b.notes)
    print_report(run.built.parity)
    if run.triton is not None:
        out.print(f"wrote Triton Inference Server entry [bold]{escape(str(run.triton.path))}[/bold]")
        print_notes(run.triton.notes)


def _print_rtx(run) -> None:
    out = console()
    for b in run.builds:
        plugins = ", ".join(f"{n} {op}" for op, n in b.plugin_layers.items()) or "none"
        fp32 = "" if b.fp32_layers is None else f"; {b.fp32_layers} layers in FP32"
        out.print(
            f"wrote [bold]{escape(str(b.path))}[/bold] (TensorRT for RTX {b.tensorrt_rtx}, {b.target}, "
            f"{b.size_bytes / 2**20:,.1f} MiB, {b.precision}, batch {b.batch['min']}-{b.batch['max']}, "
            f"{b.layers} layers; plugin layers: {plugins}{fp32}; {b.seconds:.1f}s)"
        )
        print_notes(b.notes)
    for report in run.parity.values():
        print_report(report)
    if run.not_run:
        from exporter.backends.tensorrt_rtx import NOT_RUN

        out.print(f"built, {NOT_RUN} (an RTX engine runs on an RTX GPU of its target): {', '.join(run.not_run)}")
