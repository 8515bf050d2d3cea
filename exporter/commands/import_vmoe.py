"""``moe-export import vmoe``: a reference checkpoint into a model folder."""

from __future__ import annotations

import click

from exporter.commands.common import (
    console,
    emit,
    escape,
    folder_option,
    json_option,
    progress_lines,
    routing_options,
    step,
)


@click.group("import")
def import_group():
    """Bring in models trained elsewhere: checkpoints of the reference implementation (vmoe)."""


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

    with step(f"Importing {prefix}"):
        result = run_import(prefix, output_dir, name=name, progress=progress_lines(), **overrides)
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
