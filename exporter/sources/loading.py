"""Where a model comes from: a zoo config or a user factory, plus seed and checkpoint.

A ``ModelSource`` is small and JSON-serialisable; ``export`` stores it in the ONNX metadata so that
``validate`` rebuilds exactly the PyTorch model a graph was exported from.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from exporter import settings
from exporter.errors import UserError, one_line
from exporter.fileio import sha256
from exporter.sources.swin_moe import SWIN_MOE, SwinMoEConfig
from exporter.sources.zoo import VMOE, ModelConfig, build_model, config_from_dict, get_config


@dataclass(frozen=True)
class ModelSource:
    """What to build. ``kind`` is ``"zoo"`` (``spec`` = model name) or ``"module"`` (``spec`` =
    ``path/file.py:factory`` or ``package.module:factory``)."""

    kind: str
    spec: str
    input_shape: tuple[int, ...]  # one image, e.g. (3, 224, 224)
    config: ModelConfig | SwinMoEConfig | None = None
    seed: int = settings.DEFAULT_SEED
    checkpoint: str | None = None
    checkpoint_sha256: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.spec

    @property
    def preprocessing(self) -> str:
        """What the model's images input expects (a user module: the reference's convention)."""
        return self.config.preprocessing if self.config is not None else settings.PREPROCESSING

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) from [0, 1] pixels to the model's inputs."""
        return self.config.normalization if self.config is not None else settings.REFERENCE_NORMALIZATION

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "spec": self.spec,
                "input_shape": list(self.input_shape),
                "config": self.config.to_dict() if self.config else None,
                "seed": self.seed,
                "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256,
            }
        )

    def relative_to(self, folder: str | Path) -> ModelSource:
        """The same source with its files (a module file, a checkpoint) given relative to ``folder``,
        as a graph or bundle in ``folder`` records them: no absolute path of this machine is stored,
        and the record stays valid wherever the graph is read from (see ``anchored``)."""
        return self._paths(lambda p: Path(os.path.relpath(Path(p).absolute(), Path(folder).absolute())).as_posix())

    def anchored(self, folder: str | Path) -> ModelSource:
        """The source a graph in ``folder`` records, its relative file paths resolved against ``folder``."""
        return self._paths(lambda p: p if Path(p).is_absolute() else os.path.normpath(Path(folder) / p))

    def _paths(self, change) -> ModelSource:
        spec = self.spec
        if self.kind == "module" and is_file_spec(spec):
            target, _, attr = spec.rpartition(":")
            spec = f"{change(target)}:{attr}"
        checkpoint = change(self.checkpoint) if self.checkpoint else None
        return replace(self, spec=spec, checkpoint=checkpoint)

    def verify_checkpoint(self) -> None:
        """Refuses a recorded checkpoint that is missing or whose SHA-256 is no longer the recorded one
        (a parity check against other weights would fail for no reason the report could show)."""
        if not self.checkpoint or not self.checkpoint_sha256:
            return
        _, now = checkpoint_info(self.checkpoint)
        if now != self.checkpoint_sha256:
            raise UserError(
                f"checkpoint {self.checkpoint} has changed since the export (SHA-256 {self.checkpoint_sha256[:12]}... "
                f"recorded, {now[:12]}... now); pass `checkpoint` to compare against these weights anyway"
            )

    @classmethod
    def from_json(cls, text: str, where: str = "the model record") -> ModelSource:
        """The source a graph's metadata or a bundle's manifest records, every value checked as data
        (a user error naming ``where`` otherwise); nothing is imported or read here."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise UserError(f"{where} is not JSON ({e})") from None
        checks = {
            "kind": lambda v: v in ("zoo", "module"),
            "spec": lambda v: isinstance(v, str) and 0 < len(v) <= settings.MAX_NAME_CHARS and "\0" not in v,
            "input_shape": lambda v: (
                isinstance(v, list)
                and len(v) == 3
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)
                and v[1] * v[2] <= settings.MAX_IMAGE_PIXELS
                and v[0] <= settings.MAX_CHANNELS
            ),
            "config": lambda v: v is None or isinstance(v, dict),
            "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
            "checkpoint": lambda v: (
                v is None or (isinstance(v, str) and 0 < len(v) <= settings.MAX_NAME_CHARS and "\0" not in v)
            ),
            "checkpoint_sha256": lambda v: v is None or (isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v)),
        }
        if not isinstance(d, dict):
            raise UserError(f"{where} is not a JSON object")
        bad = [k for k, ok in checks.items() if not ok(d.get(k))] + sorted(set(d) - set(checks))
        if bad:
            raise UserError(f"{where} has a missing, unknown or out-of-range {bad[0]!r}")
        try:
            config = config_from_dict(d["config"]) if d["config"] is not None else None
            if config is not None:
                config.check()
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if (d["kind"] == "zoo") != (config is not None):
            raise UserError(f"{where}: a zoo model records its config, a user module none")
        return cls(
            d["kind"],
            d["spec"],
            tuple(d["input_shape"]),
            config,
            d["seed"],
            d.get("checkpoint"),
            d.get("checkpoint_sha256"),
        )


@dataclass
class LoadedModel:
    module: nn.Module
    source: ModelSource
    family: str  # "vmoe", "soft_moe", "swin_moe", "mixed" or "dense"
    batch_multiple: int  # images per batch must be a multiple of this (V-MoE routing groups)
    moe_layers: list[str]
    routing_layers: list[str]  # the V-MoE and Swin-MoE layers among them, whose routing parity can be checked


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"``, ``"8x3x32x32"`` or ``"[8, 3, 32, 32]"`` -> ``(8, 3, 32, 32)``."""
    parts = [p for p in re.split(r"[,x\s\[\]()]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"input shape {text!r} is not a list of integers like 8,3,224,224") from None
    if len(shape) not in (3, 4) or any(d < 1 for d in shape):
        raise UserError(f"input shape {text!r} must be N,C,H,W or C,H,W with positive sizes")
    if shape[-1] * shape[-2] > settings.MAX_IMAGE_PIXELS:
        side = math.isqrt(settings.MAX_IMAGE_PIXELS)
        raise UserError(
            f"input shape {text!r} has {shape[-1] * shape[-2]:,} pixels per image; the limit is "
            f"{settings.MAX_IMAGE_PIXELS:,} ({side}x{side})"
        )
    return shape


def split_shape(shape: tuple[int, ...] | None) -> tuple[int | None, tuple[int, ...] | None]:
    """(batch or None, per-image shape or None)."""
    if shape is None:
        return None, None
    return (shape[0], shape[1:]) if len(shape) == 4 else (None, shape)


def from_zoo(
    name: str,
    *,
    seed: int = settings.DEFAULT_SEED,
    checkpoint: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    **overrides,
) -> ModelSource:
    """A zoo model by name, or a folder written by ``moe-export import vmoe`` (its config and weights)."""
    from exporter.sources.checkpoints import is_model_dir, read_model_dir

    if is_model_dir(name):
        config, weights = read_model_dir(name)
        config = config.replace(**overrides)
        checkpoint = checkpoint or str(weights)
    else:
        config = get_config(name).replace(**overrides)
    _, image_shape = split_shape(input_shape)
    if image_shape is not None and tuple(image_shape) != config.input_shape:
        got, want = "x".join(map(str, image_shape)), "x".join(map(str, config.input_shape))
        raise UserError(f"input shape {got} does not match {config.name}, which takes {want} images")
    return ModelSource("zoo", config.name, config.input_shape, config, seed, *checkpoint_info(checkpoint))


def from_vmoe_checkpoint(path: str, *, seed: int = settings.DEFAULT_SEED, **overrides) -> ModelSource:
    """The model a vmoe checkpoint's parameter tree describes, with its weights."""
    from exporter.sources.checkpoints import config_for_checkpoint

    config = config_for_checkpoint(path, **overrides)
    return ModelSource("zoo", config.name, config.input_shape, config, seed, *checkpoint_info(path))


def from_module(
    spec: str, *, input_shape: tuple[int, ...] | None, seed: int = settings.DEFAULT_SEED, checkpoint: str | None = None
) -> ModelSource:
    if ":" not in spec:
        raise UserError(f"`module={spec!r}` must look like path/to/file.py:factory or package.module:factory")
    if input_shape is None:
        raise UserError("a user module needs `input_shape`, e.g. `input_shape=8,3,224,224`")
    _, image_shape = split_shape(input_shape)
    return ModelSource("module", spec, tuple(image_shape), None, seed, *checkpoint_info(checkpoint))


def checkpoint_info(path: str | None) -> tuple[str | None, str | None]:
    if path is None:
        return None, None
    from exporter.sources.checkpoints import checkpoint_sha256, is_vmoe_checkpoint
    from exporter.sources.checkpoints.vmoe_format import resolve_prefix

    if is_vmoe_checkpoint(path) or Path(path).is_dir():
        prefix = resolve_prefix(path)
        return str(prefix.resolve()), checkpoint_sha256(prefix)
    from exporter.sources.checkpoints import swin_moe

    if swin_moe.is_swin_checkpoint(path):  # Swin's per-rank files X.pth.rank* and X.pth.master
        return str(Path(path).resolve()), swin_moe.checkpoint_sha256(path)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return str(p), sha256(p)


def is_file_spec(spec: str) -> bool:
    """Whether a ``--module`` spec names a file (``path/file.py:factory``) rather than a module."""
    target = spec.rpartition(":")[0]
    return target.endswith(".py") or "/" in target or Path(target).is_file()


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if is_file_spec(spec):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"module file {target} does not exist")
        name = f"_moe_export_user_{abs(hash(str(path.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # its sibling files import as when Python runs it (python file.py)
            sys.path.insert(0, folder)
        try:
            spec_.loader.exec_module(module)
        except Exception as e:  # the user's code: whatever it raises is a problem with their input
            raise UserError(f"importing {target} failed: {one_line(e)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # the user's code, as above
            raise UserError(f"importing {target} failed: {one_line(e)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{target} has no callable {attr!r}")
    return factory


def _load_state_dict(module: nn.Module, path: str, config: ModelConfig | SwinMoEConfig | None = None) -> None:
    from exporter.sources.checkpoints import is_vmoe_checkpoint, state_dict_for

    if isinstance(config, SwinMoEConfig) and not path.endswith(".safetensors"):  # Swin's rank files or merged file
        from exporter.sources.checkpoints import swin_moe

        checkpoint = swin_moe.read_checkpoint(path)
        if checkpoint.num_experts != config.num_experts:
            raise UserError(f"{path} has {checkpoint.num_experts} experts, {config.name} {config.num_experts}")
        module.load_state_dict(swin_moe.state_dict_for(checkpoint, config, module), strict=True)
        return
    if is_vmoe_checkpoint(path):
        if config is None:
            raise UserError(
                f"{path} is a vmoe checkpoint: it loads into a zoo model or by itself (`checkpoint` without `module`)"
            )
        module.load_state_dict(state_dict_for(path, config, module), strict=True)
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None
        raise UserError(  # torch's own message ends in advice for code, not for a CLI user
            f"checkpoint {path} pickles more than tensors, which moe-export does not unpickle (weights_only); "
            "save the state dict alone (torch.save(model.state_dict(), path)) or as .safetensors"
        ) from None
    except (OSError, EOFError, RuntimeError, ValueError, SafetensorError) as e:
        raise UserError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {path} does not fit the model: {first}") from None
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit the model: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )


def describe(module: nn.Module) -> tuple[str, int, list[str], list[str]]:
    """(family, batch multiple, MoE layer names, names of the layers with top-k routing) of any module."""
    from exporter.models.soft_moe import soft_moe_layers
    from exporter.models.swin_moe import swin_moe_layers
    from exporter.models.vmoe import vmoe_layers

    vmoe = vmoe_layers(module)
    soft = [n for n, _ in soft_moe_layers(module)]
    swin = [n for n, _ in swin_moe_layers(module)]
    family = "mixed" if vmoe and soft else VMOE if vmoe else "soft_moe" if soft else "dense"
    if swin:  # Swin-MoE routes each batch as one group: any batch size
        family = SWIN_MOE if not (vmoe or soft) else "mixed"
    multiple = math.lcm(*(m.group_images for _, m in vmoe)) if vmoe else 1
    return family, multiple, [n for n, _ in vmoe] + soft + swin, [n for n, _ in vmoe] + swin


def load(source: ModelSource, *, device: str = "cpu") -> LoadedModel:
    """Builds the PyTorch model of a source (seeded, eval mode, checkpoint applied)."""
    if source.kind == "zoo":
        module = build_model(source.config, seed=source.seed, device=device)
    else:
        factory = _import_factory(source.spec)
        torch.manual_seed(source.seed)
        try:
            module = factory()
        except UserError:
            raise
        except Exception as e:  # the user's code: whatever it raises is a problem with their input
            raise UserError(f"factory {source.spec} failed: {one_line(e)}") from None
        if not isinstance(module, nn.Module):
            raise UserError(f"factory {source.spec} returned {type(module).__name__}, not a torch.nn.Module")
        module = module.to(device).eval()
    if source.checkpoint:
        _load_state_dict(module, source.checkpoint, source.config)
    return LoadedModel(module, source, *describe(module))


def check_batch(batch: int, loaded: LoadedModel) -> None:
    """A batch must be whole routing groups, and its FP32 images at most ``settings.MAX_INPUT_BYTES``."""
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    size = batch * math.prod(loaded.source.input_shape) * 4
    if size > settings.MAX_INPUT_BYTES:
        shape = "x".join(map(str, (batch, *loaded.source.input_shape)))
        raise UserError(
            f"a batch of {batch:,} images is an input of {shape} float32, {size / 2**30:,.1f} GiB; "
            f"the limit is {settings.MAX_INPUT_BYTES / 2**30:g} GiB"
        )
    if batch % loaded.batch_multiple:
        raise UserError(
            f"batch of {batch} images is not a multiple of the routing group ({loaded.batch_multiple} images)"
        )
