"""``moe-export import vmoe`` and ``import swin-moe``: a checkpoint into a model folder."""

from __future__ import annotations

import click

from exporter.commands.console import console, emit, escape, phase
from exporter.commands.options import COUNT, POSITIVE, folder_option, json_option, routing_options


@click.group("import")
def import_group():
    """Bring in models trained elsewhere: checkpoints of the reference implementation (vmoe), Swin-MoE."""


@import_group.command("vmoe")
@click.argument("prefix", type=click.Path())
@folder_option("-o", "--output-dir", required=True, help="The model folder to write.")
@click.option(
    "--name",
    help="Model name in config.json and every report (default: the matching released config's, else the family "
    "and the checkpoint's name: vmoe-PREFIX or soft-moe-PREFIX).",
)
@routing_options
@json_option("the import report")
def import_vmoe(prefix, output_dir, name, overrides, json_out):
    """Convert a vmoe checkpoint (PREFIX.index + PREFIX.data-*) into DIR/model.safetensors and
    DIR/config.json. The architecture is read off the parameter tree; routing settings the
    checkpoint does not hold come from the matching released config or the reference's defaults
    (k=2, the released config's eval C, groups of 8 images, BPR off, float32 dispatch).
    Every --model option then takes DIR; --checkpoint PREFIX also works without importing.

    \b
    Example:
      moe-export import vmoe gs-copy/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012 -o b16-384
      moe-export export --model b16-384 -o b16-384.onnx
    """
    from exporter.sources.checkpoints import import_vmoe as run_import

    with phase(f"Importing {prefix}"):
        result = run_import(prefix, output_dir, name=name, **overrides)
    emit(result, _print_import, json_out)


def _print_import(result) -> None:
    c, src = result.config, result.source
    layers = ",".join(map(str, c["moe_layers"]))
    routing = (
        f"k={c['k']}, C={c['capacity_factor']}, groups of {c['group_images']} images, "
        f"BPR {'on' if c['batch_priority'] else 'off'}"
        if c["family"] == "vmoe"
        else f"{c['slots_per_expert']} slot(s) per expert"
    )
    console().print(
        f"{escape(result.output_dir)}: {c['name']} ({c['family']}), {c['image_size']} px, /{c['patch_size']}, "
        f"D={c['dim']}, {c['layers']} layers, MoE at {layers}, E={c['num_experts']}, {routing}, "
        f"dispatch {'bfloat16' if c['bf16_dispatch'] else 'float32'}; "
        f"{src['parameters'] / 1e6:,.1f}M parameters, sha256 {src['checkpoint_sha256'][:12]}"
    )


@import_group.command("swin-moe")
@click.argument("checkpoint", type=click.Path())
@click.option("--config", "config", required=True, type=click.Path(dir_okay=False), help="Swin's YAML for the model.")
@folder_option("-o", "--output-dir", required=True, help="The model folder to write.")
@click.option("--name", help="Model name in config.json (default: the matching zoo entry, else MODEL.NAME).")
@click.option("--k", "k", type=COUNT, help="Experts per token (the YAML's TOP_VALUE otherwise).")
@click.option(
    "--capacity-factor",
    type=POSITIVE,
    help="tutel's capacity factor (the YAML's CAPACITY_FACTOR otherwise; 0 or below: load_swin_moe_checkpoint).",
)
@click.option("--batch-priority/--no-batch-priority", default=None, help="Batch Prioritized Routing (USE_BPR).")
@json_option("the import report")
def import_swin_moe(checkpoint, config, output_dir, name, k, capacity_factor, batch_priority, json_out):
    """Convert a Swin-MoE checkpoint into DIR/model.safetensors and DIR/config.json. CHECKPOINT is the
    prefix X.pth of Swin's per-rank files (X.pth.rank0 .. X.pth.rankN-1 with each rank's experts,
    X.pth.master with the rest) or one file merged by tutel.checkpoint.gather. The architecture and
    routing (TOP_VALUE, CAPACITY_FACTOR, USE_BPR, NORMALIZE_GATE, COSINE_ROUTER) come from Swin's YAML,
    the number of experts from the checkpoint; --k, --capacity-factor and --batch-priority override.
    Every --model option then takes DIR.

    \b
    Example:
      moe-export import swin-moe swin_moe_small_patch4_window12_192_32expert_32gpu_22k.pth \\
          --config swin_moe_small_patch4_window12_192_32expert_32gpu_22k.yaml -o swin-s-32
      moe-export export --model swin-s-32 --routing-outputs -o swin-s-32.onnx
    """
    from exporter.sources.checkpoints.swin_moe import import_swin_moe as run_import

    with phase(f"Importing {checkpoint}"):
        result = run_import(
            checkpoint,
            config,
            output_dir,
            name=name,
            k=k,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
        )
    emit(result, _print_swin_import, json_out)


def _print_swin_import(result) -> None:
    c, src = result.config, result.source
    moe = sum(1 for stage in c["moe_blocks"] for b in stage if b >= 0)
    console().print(
        f"{escape(result.output_dir)}: {escape(c['name'])} (swin_moe), {c['image_size']} px, windows of "
        f"{c['window_size']}, depths {c['depths']}, {moe} MoE blocks, E={c['num_experts']}, "
        f"{'cosine' if c['cosine_router'] else 'linear'} router, k={c['k']}, C={c['capacity_factor']:g}, "
        f"BPR {'on' if c['batch_priority'] else 'off'}, the whole batch routed together; "
        f"{src['parameters'] / 1e6:,.1f}M parameters from {len(src['checkpoint_files'])} file(s), "
        f"sha256 {src['checkpoint_sha256'][:12]}"
    )
