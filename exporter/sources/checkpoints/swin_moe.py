"""Swin-MoE checkpoints (microsoft/Swin-Transformer trained with microsoft/tutel) in PyTorch.

What users have, read with ``torch.load(weights_only=True)`` (no code runs):

- **per-rank files**, as Swin's ``utils_moe.save_checkpoint(..., zero_redundancy=True)`` writes them:
  ``X.pth.rank0`` .. ``X.pth.rank{R-1}`` hold each rank's experts (``{"model": {...}}``, only the keys
  under ``<block>.mlp._moe_layer.experts.``), ``X.pth.master`` everything else, ``_num_global_experts``
  of each MoE layer among it, and (tutel keeps the parameter, frozen at zero) the ``batched_fc2_bias`` of a
  bias-free model's rank 0. With ``E >= R`` rank ``r`` holds experts ``r*E/R ..``; with ``E < R`` each
  expert is split over ``R/E`` ranks along its hidden width (and its fc2 bias along the output width).
  Rank files holding a whole state dict are taken too (their experts as above, the rest from the master,
  else from rank 0, as Swin's ``load_pretrained`` merges them).
- **one merged file**, as ``tutel.checkpoint.gather`` writes it (``{"model": {...}}`` or a bare state
  dict, every expert stacked on the first axis).

The merge is tutel's ``gather``: expert pieces concatenated in rank order on the first axis, reshaped to
``[E, ...]`` when experts are split. The model's shape comes from Swin's YAML and the number of global
experts from the checkpoint; every tensor is checked against the config, naming the first mismatch.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.errors import UserError, one_line
from exporter.sources.swin_moe import SwinMoEConfig, build_swin_moe, from_yaml, matching_config

log = logging.getLogger(__name__)

MOE_KEY = "._moe_layer."
EXPERTS_KEY = "._moe_layer.experts."
NUM_EXPERTS_KEY = "._moe_layer._num_global_experts"
DERIVED_BUFFERS = ("attn.relative_coords_table", "attn.relative_position_index", "attn_mask")
# tutel's names inside an MoE MLP -> ours (exporter.models.swin_moe.SwinMoEMlp)
RENAMES = {
    "_moe_layer.gates.0.wg.weight": "router.weight",
    "_moe_layer.gates.0.cosine_projector.weight": "router.projector.weight",
    "_moe_layer.gates.0.cosine_projector.bias": "router.projector.bias",
    "_moe_layer.gates.0.sim_matrix": "router.sim_matrix",
    "_moe_layer.gates.0.temperature": "router.temperature",
    "_moe_layer.experts.batched_fc1_w": "experts.fc1_w",
    "_moe_layer.experts.batched_fc1_bias": "experts.fc1_b",
    "_moe_layer.experts.batched_fc2_w": "experts.fc2_w",
    "_moe_layer.experts.batched_fc2_bias": "experts.fc2_b",
}
_RANK = re.compile(r"\.rank(\d+)$")


@dataclass
class SwinCheckpoint:
    """A Swin-MoE checkpoint as one state dict in Swin's names (experts merged), and where it came from."""

    path: Path  # the prefix X.pth of per-rank files, or the merged file
    files: list[Path]  # every file read, in order (ranks, then the master)
    state: dict[str, torch.Tensor]
    ranks: int  # 0 for a merged file
    rank_experts: tuple[int, ...] | None = None  # per-rank fc1 shape [local experts, hidden slice, D] of one layer

    @property
    def num_experts(self) -> int:
        counts = {int(v) for k, v in self.state.items() if k.endswith(NUM_EXPERTS_KEY)}
        if len(counts) != 1:
            raise UserError(f"{self.path}: MoE layers disagree on their number of global experts ({sorted(counts)})")
        return counts.pop()


def is_swin_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` names Swin's per-rank files (the prefix ``X.pth`` or one of its files)."""
    prefix = _prefix(Path(path))
    return Path(f"{prefix}.master").is_file() or Path(f"{prefix}.rank0").is_file()


def _prefix(path: Path) -> Path:
    name = _RANK.sub("", path.name)
    return path.with_name(name.removesuffix(".master")) if name != path.name or name.endswith(".master") else path


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint: rank files in order then the master, or the one merged file."""
    path = Path(path)
    prefix = _prefix(path)
    if not is_swin_checkpoint(prefix):
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist (neither a file nor {path}.rank0 / {path}.master)")
        return [path]
    ranks = sorted(int(m.group(1)) for p in prefix.parent.glob(f"{prefix.name}.rank*") if (m := _RANK.search(p.name)))
    missing = [r for r in range(max(ranks, default=-1) + 1) if r not in ranks]
    if not ranks or missing:
        raise UserError(f"rank file {prefix}.rank{missing[0] if missing else 0} is missing")
    files = [Path(f"{prefix}.rank{r}") for r in ranks]
    master = Path(f"{prefix}.master")
    return files + ([master] if master.is_file() else [])


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 over the checkpoint's files in order (one checkpoint, one hash)."""
    from exporter.fileio import sha256

    return sha256(*checkpoint_files(path))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """One file's state dict: ``{"model": {...}}`` or a bare one, tensors only (``weights_only``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None
        raise UserError(
            f"{path} pickles more than tensors (e.g. a config object), which moe-export does not unpickle "
            "(weights_only); save {'model': model.state_dict()} alone"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{path} is not a state dict: {bad} is a {type(state[bad]).__name__}, not a tensor")
    return dict(state)


def read_checkpoint(path: str | Path) -> SwinCheckpoint:
    """Reads per-rank files or one merged file into one state dict with every expert (tutel's gather)."""
    files = checkpoint_files(path)
    if len(files) == 1 and not is_swin_checkpoint(files[0]):
        log.info(f"reading {files[0].name}")
        state = load_state(files[0])
        _check_swin(state, files[0])
        return SwinCheckpoint(Path(path), files, state, 0)
    ranks = [f for f in files if _RANK.search(f.name)]
    master = files[len(ranks)] if len(files) > len(ranks) else None
    merged: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[torch.Tensor]] = {}
    first_keys = None
    for r, f in enumerate(ranks):
        log.info(f"reading {f.name} ({r + 1} of {len(ranks)})")
        state = load_state(f)
        experts = {k: v for k, v in state.items() if EXPERTS_KEY in k}
        if first_keys is None:
            first_keys = experts.keys()
        elif experts.keys() != first_keys:
            odd = sorted(set(experts) ^ set(first_keys))[0]
            raise UserError(f"rank files disagree: {odd} is in one of {ranks[0].name} and {f.name} only")
        for k, v in experts.items():
            if pieces.get(k) and tuple(pieces[k][0].shape) != tuple(v.shape):
                raise UserError(
                    f"rank files disagree: {k} is {list(v.shape)} in {f.name}, {list(pieces[k][0].shape)} in "
                    f"{ranks[0].name}"
                )
            pieces.setdefault(k, []).append(v)
        if r == 0:  # rank files with whole state dicts: the rest comes from rank 0 (the master overrides it)
            merged.update({k: v for k, v in state.items() if EXPERTS_KEY not in k})
    if master is not None:
        log.info(f"reading {master.name}")
        merged.update(load_state(master))
    _check_swin(merged, master or ranks[0])
    checkpoint = SwinCheckpoint(_prefix(Path(path)), files, merged, len(ranks))
    num_experts = checkpoint.num_experts
    for k, parts in pieces.items():
        whole = torch.cat(parts, dim=0)
        if num_experts % len(ranks) == 0:
            if whole.shape[0] < num_experts:
                raise UserError(
                    f"rank file {checkpoint.path}.rank{len(ranks)} is missing: {len(ranks)} rank file(s) hold "
                    f"{whole.shape[0]} of the {num_experts} experts (_num_global_experts) of {k}"
                )
            if whole.shape[0] != num_experts:
                raise UserError(
                    f"{len(ranks)} rank files hold {whole.shape[0]} experts of {k}, the master {num_experts} "
                    "(_num_global_experts): the rank files are from another run"
                )
        elif len(ranks) % num_experts == 0:
            whole = whole.reshape(num_experts, -1, *whole.shape[2:])
        else:
            raise UserError(f"{len(ranks)} rank files cannot split {num_experts} experts (neither divides the other)")
        merged[k] = whole
    fc1 = next((parts[0] for k, parts in pieces.items() if k.endswith("batched_fc1_w")), None)
    checkpoint.rank_experts = tuple(fc1.shape) if fc1 is not None else None
    return checkpoint


def _check_swin(state: Mapping[str, torch.Tensor], where: Path) -> None:
    if not any(MOE_KEY in k for k in state):
        hint = "a dense model" if any(k.startswith("layers.") for k in state) else "another model"
        raise UserError(
            f"{where} is not a Swin-MoE checkpoint: no tutel MoE layer (keys like "
            f"layers.2.blocks.1.mlp._moe_layer.*); it looks like {hint}"
        )
    if not any(k.endswith(NUM_EXPERTS_KEY) for k in state):
        raise UserError(
            f"{where} has no _num_global_experts (a checkpoint from tutel before that buffer existed); "
            "load it in Swin once and save it again"
        )


def _rename(key: str) -> str | None:
    """Swin's key -> ours; None for what the model derives (buffers, the experts count)."""
    if key.endswith(NUM_EXPERTS_KEY) or key.endswith(DERIVED_BUFFERS):
        return None
    head, sep, tail = key.partition(".mlp._moe_layer.")
    if not sep:
        return key
    return f"{head}.mlp.{RENAMES.get('_moe_layer.' + tail, '_moe_layer.' + tail)}"


def state_dict_for(checkpoint: SwinCheckpoint, config: SwinMoEConfig, module=None) -> dict[str, torch.Tensor]:
    """The state dict of ``config``'s model from a read checkpoint. Every tensor is checked against the
    config, naming the first that does not fit; derived buffers are checked for shape and recomputed."""
    model = module if module is not None else build_swin_moe(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {k: tuple(v.shape) for k, v in model.named_buffers()}
    state, problems = {}, []
    for key, value in checkpoint.state.items():
        ours = _rename(key)
        if ours is None:  # the experts count (checked when read) or a buffer the model derives (same names)
            if key.endswith(DERIVED_BUFFERS) and key not in buffers:
                problems.append(f"{key} is not in a model of this config")
            elif key.endswith(DERIVED_BUFFERS) and tuple(value.shape) != buffers[key]:
                problems.append(f"{key} is {list(value.shape)}, the config's {list(buffers[key])}")
            continue
        if ours.endswith("experts.fc2_b") and not config.mlp_fc2_bias:
            if value.count_nonzero():  # tutel keeps the frozen parameter; Swin's saver leaves it in the master
                problems.append(f"{key} is not zero, but the config has MLP_FC2_BIAS: False")
            continue
        if ours not in expected:
            problems.append(f"{key} is not in a model of this config")
            continue
        if tuple(value.shape) != expected[ours]:
            problems.append(f"{key} is {list(value.shape)}, the config's {list(expected[ours])}")
            continue
        state[ours] = value.float().contiguous()
    missing = [k for k in expected if k not in state]
    problems += [f"{_swin_name(k)} is missing" for k in missing]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"checkpoint {checkpoint.path} does not match the config {config.name}: {problems[0]}{more}")
    return state


def _swin_name(ours: str) -> str:
    back = {v: k for k, v in RENAMES.items()}
    head, sep, tail = ours.partition(".mlp.")
    return f"{head}.mlp.{back[tail]}" if sep and tail in back else ours


def check_rank_layout(checkpoint: SwinCheckpoint, config: SwinMoEConfig, local_experts: int) -> None:
    """Per-rank files against the YAML's ``NUM_LOCAL_EXPERTS`` (experts per GPU, or ``-s``: one expert split
    over ``s`` GPUs): when the rank files hold what that run's ranks held, there must be as many as it had
    (a missing slice of split experts still reads as whole experts of half the width). A layout that differs
    from the YAML's is left to the shape check, which names the tensor."""
    if not checkpoint.ranks or checkpoint.rank_experts is None:
        return
    held, hidden_slice = checkpoint.rank_experts[0], checkpoint.rank_experts[1]
    stage = next(i for i, blocks in enumerate(config.moe_blocks) if any(b >= 0 for b in blocks))
    hidden = int(config.embed_dim * 2**stage * config.mlp_ratio)
    want = (local_experts, hidden) if local_experts > 0 else (1, hidden // -local_experts)
    ranks = config.num_experts // local_experts if local_experts > 0 else config.num_experts * -local_experts
    if (held, hidden_slice) == want and checkpoint.ranks < ranks:
        raise UserError(
            f"rank file {checkpoint.path}.rank{checkpoint.ranks} is missing: NUM_LOCAL_EXPERTS: {local_experts} "
            f"puts {config.num_experts} experts on {ranks} ranks"
        )


def config_for_checkpoint(
    checkpoint: SwinCheckpoint, yaml_path: str | Path, *, name: str | None = None, **overrides
) -> SwinMoEConfig:
    """The config of Swin's YAML for this checkpoint's experts, the zoo entry's name when it is one,
    with the non-``None`` routing overrides applied."""
    config, swin = from_yaml(yaml_path, num_experts=checkpoint.num_experts, name=name)
    check_rank_layout(checkpoint, config, int(swin["NUM_LOCAL_EXPERTS"]))
    zoo = matching_config(config)
    if zoo is not None and name is None:
        config = zoo
    return config.replace(**overrides)


def load_swin_moe_checkpoint(
    path: str | Path,
    *,
    config: str | Path | SwinMoEConfig,
    k: int | None = None,
    capacity_factor: float | None = None,
    batch_priority: bool | None = None,
):
    """A Swin-MoE checkpoint (the prefix ``X.pth`` of per-rank files, or a merged file) as a PyTorch model
    in eval mode, taking ImageNet-normalised NCHW float32 images (``settings.SWIN_MOE_PREPROCESSING``) and
    returning logits.

    Args:
        path: ``X.pth`` (reads ``X.pth.rank*`` and ``X.pth.master``) or one merged file.
        config: Swin's YAML for the model (or a ``SwinMoEConfig`` whose experts match the checkpoint's).
        k, capacity_factor, batch_priority: Override the YAML's ``TOP_VALUE``, ``CAPACITY_FACTOR`` and
            ``USE_BPR`` (``capacity_factor`` 0: tutel's dynamic capacity; below 0: dynamic and bounded).
    """
    checkpoint = read_checkpoint(path)
    overrides = dict(k=k, capacity_factor=capacity_factor, batch_priority=batch_priority)
    if isinstance(config, SwinMoEConfig):
        if config.num_experts != checkpoint.num_experts:
            raise UserError(f"{config.name} has {config.num_experts} experts, the checkpoint {checkpoint.num_experts}")
        config = config.replace(**overrides)
    else:
        config = config_for_checkpoint(checkpoint, config, **overrides)
    model = build_swin_moe(config, device="meta")
    model.load_state_dict(state_dict_for(checkpoint, config, model), strict=True, assign=True)
    return model.derive_buffers_().eval()


__all__ = [
    "SwinCheckpoint",
    "checkpoint_files",
    "checkpoint_sha256",
    "config_for_checkpoint",
    "is_swin_checkpoint",
    "load_swin_moe_checkpoint",
    "read_checkpoint",
    "state_dict_for",
]


def import_swin_moe(
    checkpoint: str | Path,
    config: str | Path,
    output_dir: str | Path,
    *,
    name: str | None = None,
    **overrides,
):
    """Converts a Swin-MoE checkpoint (per-rank files or a merged file) and Swin's YAML into
    ``output_dir/{model.safetensors,config.json}``, the folder every ``--model`` takes. The folder is
    assembled beside ``output_dir`` and moved into place; an existing import there is replaced, any other
    non-empty folder refused."""
    import json
    import os

    from safetensors.torch import save_file

    from exporter import settings
    from exporter.fileio import check_output, check_space, current_umask, publish_dir, sha256, temp_dir
    from exporter.sources.checkpoints import CONFIG_FILE, FORMAT, WEIGHTS_FILE, ImportResult, is_model_dir

    out = check_output(output_dir, folder=True)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_model_dir(out))):
        raise UserError(f"{out} exists and is not a moe-export model folder: choose another -o")
    read = read_checkpoint(checkpoint)
    swin_config = config_for_checkpoint(read, config, name=name, **overrides)
    state = state_dict_for(read, swin_config)
    del read
    check_space(out, sum(t.numel() * t.element_size() for t in state.values()) + (1 << 20), "the model folder")
    files = checkpoint_files(checkpoint)
    log.info(f"hashing {len(files)} checkpoint file(s)")
    source = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_files": [f.name for f in files],
        "checkpoint_sha256": sha256(*files),
        "config": str(Path(config).resolve()),
        "config_sha256": sha256(config),
        "parameters": int(sum(t.numel() for t in state.values())),
    }
    meta = {"format": FORMAT, "model": swin_config.to_dict(), "preprocessing": settings.SWIN_MOE_PREPROCESSING}
    meta["source"] = source
    with temp_dir(out) as tmp:
        log.info(f"writing {WEIGHTS_FILE}")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~current_umask())  # safetensors writes 0600
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        written = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        publish_dir(tmp, out)
    return ImportResult(str(out), swin_config.to_dict(), source, written)


def to_swin_state(state: Mapping[str, torch.Tensor], config: SwinMoEConfig) -> dict[str, torch.Tensor]:
    """Our state dict in Swin's names and merged layout, as Swin's model holds it in one process: the
    derived buffers and each MoE layer's ``_num_global_experts`` included, and for a bias-free model the
    zero ``batched_fc2_bias`` tutel keeps."""
    model = build_swin_moe(config, device="meta").derive_buffers_()
    back = {v: k for k, v in RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".mlp.")
        out[f"{head}.mlp.{back[tail]}" if sep and tail in back else key] = value
    out.update((key, value.clone()) for key, value in model.named_buffers())  # the names are Swin's
    for layer in config.moe_layer_names():
        out[f"{layer}._moe_layer._num_global_experts"] = torch.tensor(config.num_experts)
        if not config.mlp_fc2_bias:
            width = out[f"{layer}._moe_layer.experts.batched_fc2_w"].shape[-1]
            out[f"{layer}._moe_layer.experts.batched_fc2_bias"] = torch.zeros(config.num_experts, width)
    return out


def split_ranks(
    swin: Mapping[str, torch.Tensor], config: SwinMoEConfig, ranks: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Swin's merged state dict (``to_swin_state``) as the ``ranks`` files of Swin's rank-sharded saver:
    each rank's trained expert parameters (tutel's layout on that many GPUs: ``E / R`` experts a rank, or
    each expert split over ``R / E`` ranks along its hidden width, its fc2 bias along the output width) and
    the master (the rest; a bias-free model's frozen zero fc2 bias as rank 0 holds it)."""
    experts = config.num_experts
    if experts % ranks and ranks % experts:
        raise UserError(f"{ranks} ranks cannot hold {experts} experts (neither divides the other)")
    split = max(ranks // experts, 1)  # ranks per expert (tutel's sharded_count)
    trained = ["batched_fc1_w", "batched_fc1_bias", "batched_fc2_w"] + (["batched_fc2_bias"] * config.mlp_fc2_bias)
    rank_keys = [k for k in swin if EXPERTS_KEY in k and k.endswith(tuple(trained))]
    per_rank = []
    for r in range(ranks):
        if split == 1:
            per_rank.append({k: swin[k].chunk(ranks)[r].clone() for k in rank_keys})
        else:  # expert r // split, slice r % split of its hidden (or, for the fc2 bias, output) width
            per_rank.append(
                {k: swin[k][r // split].unsqueeze(0).chunk(split, dim=1)[r % split].clone() for k in rank_keys}
            )
    master = {k: v for k, v in swin.items() if k not in rank_keys}
    for key in [k for k in master if k.endswith(".experts.batched_fc2_bias")]:  # rank 0's frozen zeros
        master[key] = master[key][: max(experts // ranks, 1)].chunk(split, dim=1)[0].clone()
    return per_rank, master


def write_checkpoint(
    path: str | Path, state: Mapping[str, torch.Tensor], config: SwinMoEConfig, *, ranks: int | None = None
) -> list[Path]:
    """Writes our state dict as Swin-MoE users have it: with ``ranks``, per-rank files ``path.rank{r}`` and
    ``path.master`` as Swin's rank-sharded saver writes them (``split_ranks``); without, one merged file as
    ``tutel.checkpoint.gather`` writes it. For synthetic checkpoints of the released models' layouts."""
    swin = to_swin_state(state, config)
    path = Path(path)
    if ranks is None:
        torch.save({"model": swin}, path)
        return [path]
    per_rank, master = split_ranks(swin, config, ranks)
    files = [Path(f"{path}.rank{r}") for r in range(ranks)] + [Path(f"{path}.master")]
    for f, part in zip(files, [*per_rank, master]):
        torch.save({"model": part}, f)
    return files
