"""Checkpoints written by the reference implementation (google-research/vmoe), in PyTorch.

``load_vmoe_checkpoint`` gives a ready model; ``import_vmoe`` writes it as ``model.safetensors`` and
``config.json`` in a folder that every ``--model`` option takes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from exporter import settings
from exporter.errors import UserError
from exporter.sources.checkpoints.vmoe_format import (
    is_vmoe_checkpoint,
    read_checkpoint,
    read_index,
    read_shapes,
    resolve_prefix,
    shard_path,
)

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT = "moe-export model"

__all__ = [
    "ImportResult",
    "checkpoint_files",
    "checkpoint_sha256",
    "config_for_checkpoint",
    "import_vmoe",
    "is_model_dir",
    "is_vmoe_checkpoint",
    "load_vmoe_checkpoint",
    "read_model_dir",
    "state_dict_for",
]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The index and every shard of a vmoe checkpoint."""
    prefix = resolve_prefix(path)
    count, _, _ = read_index(prefix)
    return [Path(f"{prefix}.index")] + [shard_path(prefix, i, count) for i in range(count)]


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 over the index and the shards in order (one checkpoint, one hash)."""
    from exporter.fileio import sha256

    files = checkpoint_files(path)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"vmoe checkpoint shard {missing[0]} is missing")
    return sha256(*files)


def config_for_checkpoint(path: str | Path, *, name: str | None = None, **overrides):
    """The ``ModelConfig`` a vmoe checkpoint's parameter tree describes (index only, no weights)."""
    from exporter.sources.checkpoints.vit_moe import infer_config

    return infer_config(read_shapes(path), name=name, checkpoint=resolve_prefix(path).name, **overrides)


def state_dict_for(path: str | Path, config, module=None):
    """The torch state dict of ``config``'s model from a vmoe checkpoint; the checkpoint's own
    architecture must be ``config``'s (one line naming the first difference otherwise)."""
    from exporter.sources.checkpoints.vit_moe import architecture_of, infer_architecture, to_state_dict

    params, _ = read_checkpoint(path)
    arch, want = infer_architecture({k: v.shape for k, v in params.items()}), architecture_of(config)
    diff = [f for f in want if arch[f] != want[f]]
    if diff:
        f = diff[0]
        raise UserError(
            f"checkpoint {resolve_prefix(path)} is not a {config.name}: its {f} is {arch[f]}, not {want[f]}"
        )
    return to_state_dict(params, config, module)


def load_vmoe_checkpoint(
    path: str | Path,
    *,
    k: int | None = None,
    capacity_factor: float | None = None,
    batch_priority: bool | None = None,
    group_images: int | None = None,
    bf16_dispatch: bool | None = None,
):
    """A vmoe checkpoint (its prefix or ``.index`` file) as a PyTorch model in eval mode, taking NCHW
    float32 images in [-1, 1] and returning logits. Routing settings a checkpoint does not hold come
    from the matching released config, else the reference's defaults, unless given here."""
    from exporter.sources.zoo import build_model

    config = config_for_checkpoint(
        path,
        k=k,
        capacity_factor=capacity_factor,
        batch_priority=batch_priority,
        group_images=group_images,
        bf16_dispatch=bf16_dispatch,
    )
    model = build_model(config, device="meta")
    model.load_state_dict(state_dict_for(path, config, model), strict=True, assign=True)
    return model.eval()


@dataclass
class ImportResult:
    output_dir: str
    config: dict
    source: dict
    files: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"output_dir": self.output_dir, "config": self.config, "source": self.source, "files": self.files}


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file()


def model_dir_listing(path: str | Path) -> set[str] | None:
    """The files of a model folder ``import_vmoe`` wrote (its config.json, marked with the format and
    listing the files beside it), or None when ``path`` holds no such config: what a new import may
    replace there (``fileio.check_replaceable``). Any other config.json is the user's."""
    try:
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    files = meta.get("files", {WEIGHTS_FILE: None})  # imports before the list named only their weights
    if not isinstance(files, dict) or not all(isinstance(n, str) and n and "/" not in n for n in files):
        return None
    return {CONFIG_FILE, *files}


def read_model_dir(path: str | Path):
    """(config, weights path) of a folder written by ``import_vmoe`` or ``import_swin_moe``."""
    from exporter.sources.zoo import config_from_dict

    p = Path(path)
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        config = config_from_dict(meta["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p / CONFIG_FILE} is not a moe-export model config: {e}") from None
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"model folder {p} has no {WEIGHTS_FILE}")
    config.check()
    return config, weights


def import_vmoe(
    path: str | Path,
    output_dir: str | Path,
    *,
    name: str | None = None,
    **overrides,
) -> ImportResult:
    """Converts a vmoe checkpoint into ``output_dir/{model.safetensors,config.json}``. The folder is
    assembled beside ``output_dir`` and moved into place. An earlier import there (its config.json
    marks it and lists its files) is replaced; a folder holding anything else, any other non-empty
    folder, the working folder and the folders holding it are refused (``fileio.check_replaceable``)."""
    import os

    from safetensors.torch import save_file

    from exporter.fileio import check_output, check_replaceable, check_space, current_umask, publish_dir, temp_dir
    from exporter.formats.bundle import file_entry

    out = check_output(output_dir, folder=True)
    check_replaceable(out, model_dir_listing(out), "model folder")
    prefix = resolve_prefix(path)
    config = config_for_checkpoint(prefix, name=name, **overrides)
    state = state_dict_for(prefix, config)
    check_space(out, sum(t.numel() * t.element_size() for t in state.values()) + (1 << 20), "the model folder")
    log.info(f"hashing {prefix.name}")
    source = {
        "checkpoint": str(prefix.resolve()),
        "checkpoint_sha256": checkpoint_sha256(prefix),
        "parameters": int(sum(t.numel() for t in state.values())),
    }
    meta = {
        "format": FORMAT,
        "model": config.to_dict(),
        "preprocessing": settings.PREPROCESSING,
        "source": source,
    }
    with temp_dir(out) as tmp:
        log.info(f"writing {WEIGHTS_FILE}")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~current_umask())  # safetensors writes 0600
        meta["files"] = {WEIGHTS_FILE: file_entry(tmp / WEIGHTS_FILE)}  # with the format: what a new import replaces
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        publish_dir(tmp, out)
    return ImportResult(str(out), config.to_dict(), source, files)
