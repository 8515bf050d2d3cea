"""Which model a command means: the options every model command shares, resolved in one place.

``ModelChoice`` is what a user gives on the command line (a zoo name or model folder, a user module, a
checkpoint, a seed, routing overrides); ``resolve`` turns it into the ``ModelSource`` the library
takes, starting from the model a graph records when there is one (validate, inspect routing on a
graph). The library never sees a ModelChoice: its functions take a ModelSource.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from exporter import settings
from exporter.errors import UserError

if TYPE_CHECKING:  # loading imports torch; this module stays light for the CLI's option parsing
    from exporter.sources.loading import ModelSource

ROUTING_FIELDS = ("k", "capacity_factor", "batch_priority", "group_images", "bf16_dispatch")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelChoice:
    """The model options of every model command; None means "not given"."""

    model: str | None = None  # zoo name or a folder written by `import vmoe`
    module: str | None = None  # FILE.py:factory or package.module:factory
    input_shape: str | None = None  # "N,C,H,W" of a user module
    checkpoint: str | None = None
    seed: int | None = None
    k: int | None = None
    capacity_factor: float | None = None
    batch_priority: bool | None = None
    group_images: int | None = None
    bf16_dispatch: bool | None = None

    @property
    def overrides(self) -> dict:
        """The routing overrides given, by ModelConfig field."""
        return {f: getattr(self, f) for f in ROUTING_FIELDS if getattr(self, f) is not None}

    @property
    def batch(self) -> int | None:
        """The N of an ``--input-shape N,C,H,W`` (None for ``C,H,W`` or none): the images export traces
        with and validate and bench run, where no batch is given."""
        from exporter.sources.loading import parse_shape

        shape = parse_shape(self.input_shape) if self.input_shape else ()
        return shape[0] if len(shape) == 4 else None

    @property
    def given(self) -> bool:
        """Whether any option names or changes the model."""
        return any(v is not None for v in asdict(self).values())

    def replace(self, **changes) -> ModelChoice:
        return ModelChoice(**{**asdict(self), **changes})


def _seed(seed: int | None) -> int:
    return settings.DEFAULT_SEED if seed is None else seed


def resolve(choice: ModelChoice, recorded: ModelSource | None = None) -> ModelSource:
    """The ModelSource a choice means. ``recorded`` is the model a graph was exported from: with no
    --model/--module it is the starting point, and the options given change it."""
    from exporter.sources import loading

    c, overrides = choice, choice.overrides
    if c.model and c.module:
        raise UserError("give either --model or --module, not both")
    if c.module:
        if overrides:
            raise UserError(
                "--k, --capacity-factor, --batch-priority, --group-images and --bf16-dispatch only apply to --model"
            )
        shape = loading.parse_shape(c.input_shape) if c.input_shape else None
        return loading.from_module(c.module, input_shape=shape, seed=_seed(c.seed), checkpoint=c.checkpoint)
    if c.model is None and recorded is not None:
        return _from_recorded(c, recorded)
    if c.model is None and c.checkpoint:
        return _from_checkpoint(c)
    if c.model is None:
        raise UserError("give --model NAME (see `moe-export models`) or --module FILE.py:FACTORY")
    shape = loading.parse_shape(c.input_shape) if c.input_shape else None
    return loading.from_zoo(c.model, seed=_seed(c.seed), checkpoint=c.checkpoint, input_shape=shape, **overrides)


def _from_recorded(c: ModelChoice, recorded: ModelSource) -> ModelSource:
    """The recorded model, changed by the options. Its own checkpoint is hashed once, here, and must
    still be the one it was exported with; a ``--checkpoint`` given replaces it."""
    from exporter.sources import loading
    from exporter.sources.loading import ModelSource

    if not c.checkpoint:
        recorded.verify_checkpoint()
    if recorded.kind == "zoo":  # the graph's own config, then the overrides
        config = recorded.config.replace(**c.overrides)
        seed = recorded.seed if c.seed is None else c.seed
        checkpoint = (
            loading.checkpoint_info(c.checkpoint) if c.checkpoint else (recorded.checkpoint, recorded.checkpoint_sha256)
        )
        return ModelSource("zoo", recorded.spec, config.input_shape, config, seed, *checkpoint)
    if c.overrides:
        raise UserError("--k, --capacity-factor, --batch-priority and --group-images only apply to zoo models")
    if c.checkpoint:
        return loading.from_module(
            recorded.spec, input_shape=recorded.input_shape, seed=_seed(c.seed), checkpoint=c.checkpoint
        )
    return recorded if c.seed is None else replace(recorded, seed=c.seed)


def _from_checkpoint(c: ModelChoice) -> ModelSource:
    """--checkpoint alone: a vmoe checkpoint describes its model; a weights file does not."""
    from exporter.sources import loading
    from exporter.sources.checkpoints import is_vmoe_checkpoint

    path = Path(c.checkpoint)
    weights_file = path.suffix in WEIGHT_SUFFIXES
    if is_vmoe_checkpoint(c.checkpoint) or path.is_dir() or not (path.exists() or weights_file):
        return loading.from_vmoe_checkpoint(c.checkpoint, seed=_seed(c.seed), **c.overrides)
    if not path.exists():
        raise UserError(f"checkpoint {c.checkpoint} does not exist")
    raise UserError(f"{c.checkpoint} holds weights only: give --model NAME or --module FILE.py:FACTORY with it")
