"""Model zoo: the papers' configurations of both families, plus tiny ones for tests."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from exporter import settings
from exporter.errors import UserError
from exporter.sources.swin_moe import (
    SWIN_MOE,
    SWIN_MOE_ZOO,
    SwinMoEConfig,
    build_swin_moe,
    config_args,
    seeded_model,
    swin_moe_param_count,
)

VMOE, SOFT_MOE = "vmoe", "soft_moe"
# The config fields of one family only: a config records those of its own family (``ModelConfig.to_dict``).
FAMILY_FIELDS = {
    VMOE: ("k", "capacity_factor", "batch_priority", "group_images", "ceil_or_round", "multiple_of"),
    SOFT_MOE: ("slots_per_expert",),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and MoE settings of a zoo model. Routing fields apply to their family only."""

    name: str
    family: str
    summary: str
    image_size: int
    patch_size: int
    dim: int
    mlp_dim: int
    heads: int
    layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    num_classes: int
    representation_size: int | None = None
    classifier: str = "token"
    qk_norm: bool = False
    in_chans: int = 3
    # V-MoE routing
    k: int = 2
    capacity_factor: float = 1.05
    batch_priority: bool = False
    group_images: int = settings.DEFAULT_GROUP_IMAGES
    ceil_or_round: str = settings.DEFAULT_CAPACITY_CEIL_OR_ROUND
    multiple_of: int | None = settings.DEFAULT_CAPACITY_MULTIPLE_OF
    # Soft-MoE
    slots_per_expert: int = 1
    # Both: the reference's bfloat16 rounding of expert inputs and outputs (Bfloat16Dispatcher)
    bf16_dispatch: bool = False
    tags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (1 if self.classifier == "token" else 0)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    @property
    def batch_multiple(self) -> int:
        """Images per batch must be a multiple of this (the routing group for V-MoE)."""
        return self.group_images if self.family == VMOE else 1

    @property
    def preprocessing(self) -> str:
        """What the images input expects."""
        return settings.PREPROCESSING

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) from [0, 1] pixels to the inputs: [-1, 1]."""
        return settings.REFERENCE_NORMALIZATION

    def replace(self, **overrides) -> ModelConfig:
        """A copy with the non-``None`` overrides applied and checked."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if self.family != VMOE:
            vmoe_only = sorted(set(overrides) & set(FAMILY_FIELDS[VMOE]))
            if vmoe_only:
                raise UserError(f"{', '.join(vmoe_only)} only apply to V-MoE models, not to {self.name}")
        config = dataclasses.replace(self, **overrides)
        config.check()
        return config

    def check(self) -> None:
        if self.family == VMOE:
            from exporter.models.routing import check_capacity_factor

            if not 1 <= self.k <= self.num_experts:
                raise UserError(f"k must be between 1 and the number of experts ({self.num_experts}), got {self.k}")
            check_capacity_factor(self.capacity_factor)
            if self.group_images < 1:
                raise UserError(f"group size must be at least 1 image, got {self.group_images}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.layers]
        if bad:
            raise UserError(f"MoE layer indices {bad} out of range for {self.layers} layers")
        self._check_ranges()

    def _check_ranges(self) -> None:
        """The sizes a config read from a file (a graph's record, an imported folder) may hold."""
        sizes = ("image_size", "patch_size", "dim", "mlp_dim", "heads", "layers", "num_experts", "num_classes")
        small = [f for f in (*sizes, "in_chans", "slots_per_expert") if getattr(self, f) < 1]
        if small or (self.representation_size is not None and self.representation_size < 1):
            raise UserError(f"config {self.name}: {', '.join(small) or 'representation_size'} must be at least 1")
        if self.family not in (VMOE, SOFT_MOE) or self.classifier not in ("token", "gap"):
            raise UserError(f"config {self.name}: family {self.family!r} / classifier {self.classifier!r} unknown")
        if self.ceil_or_round not in ("ceil", "round") or (self.multiple_of is not None and self.multiple_of < 1):
            raise UserError(f"config {self.name}: capacity rounding {self.ceil_or_round!r}/{self.multiple_of} unknown")
        if self.patch_size > self.image_size or self.image_size**2 > settings.MAX_IMAGE_PIXELS:
            raise UserError(f"config {self.name}: {self.image_size} px images in {self.patch_size} px patches")
        if self.dim % self.heads:
            raise UserError(f"config {self.name}: width {self.dim} is not a multiple of {self.heads} heads")
        if (params := param_count(self)) > settings.MAX_MODEL_PARAMETERS:
            raise UserError(
                f"config {self.name} has {params:,} parameters; the limit is {settings.MAX_MODEL_PARAMETERS:,}"
            )

    def to_dict(self) -> dict:
        """The config as JSON data: every field but the tags and the other family's routing fields."""
        other = {f for family, fields in FAMILY_FIELDS.items() if family != self.family for f in fields}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in other and k != "tags"}
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """The config of a dict (``to_dict``), each value's type checked: it comes from a file (a
        graph's metadata, an imported folder's config.json). A user error names the first bad field;
        the ranges are ``check``'s."""
        if not isinstance(d, dict):
            raise UserError(f"a model config must be a JSON object, not {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "tags"}
        unknown = sorted(set(d) - set(fields))
        missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING]
        bad = [n for n in fields if n in d and not _typed(fields[n].type, d[n])]
        if unknown or missing or bad:
            what = "unknown" if unknown else "missing" if missing else "of the wrong type"
            raise UserError(f"model config field {(unknown or missing or bad)[0]!r} is {what}")
        d = dict(d)
        d["moe_layers"] = tuple(d["moe_layers"])
        return cls(**d)


def _typed(annotation: str, value) -> bool:
    """Whether a JSON value fits a ModelConfig field's annotation (``int``, ``float | None``, ...)."""
    if annotation.endswith(" | None"):
        return value is None or _typed(annotation.removesuffix(" | None"), value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**31
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "str":
        return isinstance(value, str) and len(value) <= settings.MAX_NAME_CHARS
    if annotation == "tuple[int, ...]":
        return isinstance(value, (list, tuple)) and all(_typed("int", v) for v in value)
    raise AssertionError(f"ModelConfig field of type {annotation} has no check")  # a new field needs one


def every(n: int, layers: int) -> tuple[int, ...]:
    """V-MoE 'Every n': blocks n-1, 2n-1, ... (0-based)."""
    return tuple(range(n - 1, layers, n))


def last(n: int, layers: int) -> tuple[int, ...]:
    """V-MoE 'Last n': the last n odd blocks."""
    return tuple(range(1, layers, 2))[-n:]


def last_half(layers: int) -> tuple[int, ...]:
    """Soft-MoE: MoE in the second half of the blocks."""
    return tuple(range(layers // 2, layers))


def _entry(base: dict, name: str, summary: str, **differences) -> ModelConfig:
    """A zoo entry: a base's fields (a family of models) with its name, summary and the fields that differ."""
    return ModelConfig(name=name, summary=summary, **{**base, **differences})


_S = dict(dim=384, mlp_dim=1536, heads=6, layers=12)
_B = dict(dim=768, mlp_dim=3072, heads=12, layers=12)
# The bases: the fields a family's entries share. V-MoE S/32 is 8 layers, D=512, MoE in the last 2 odd blocks;
# V-MoE B/16 has MoE in every other block; Soft MoE pools globally (gap) and normalises queries and keys.
_V = dict(family=VMOE, image_size=224, num_experts=8, num_classes=1000)
_V_S32 = dict(_V, patch_size=32, dim=512, mlp_dim=2048, heads=8, layers=8, moe_layers=last(2, 8))
_V_B16 = dict(_V, **_B, patch_size=16, moe_layers=every(2, 12))
_SOFT = dict(family=SOFT_MOE, classifier="gap", qk_norm=True)
_SOFT_S16 = dict(
    _S, **_SOFT, image_size=224, patch_size=16, moe_layers=last_half(12), num_experts=128, num_classes=29593
)
_TINY = dict(image_size=32, patch_size=4, dim=32, mlp_dim=64, heads=4, layers=4, num_classes=10, tags=("tiny",))
_RELEASED = ("released",)

ZOO: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _entry(
            _V_S32,
            "vmoe-s32-last2-e8",
            "V-MoE S/32, Last-2, E=8, k=2: the released S/32 at C=1.05 (training); it evaluates at 4.0",
            representation_size=512,
        ),
        _entry(
            _V_B16,
            "vmoe-b16-every2-e8",
            "V-MoE B/16, Every-2, E=8, k=2, 224 px, 1000 classes: neither released B/16 (21k classes; 384 px)",
        ),
        # The released checkpoints (google-research/vmoe README), with the capacity factor each
        # config evaluates at; routing groups of 8 images; BPR off as trained. bf16_dispatch stays
        # off (float32, the default); set it to match the reference's bfloat16 dispatch exactly.
        _entry(
            _V_S32,
            "vmoe-s32-last2-ilsvrc2012",
            "released vmoe_s32_last2_ilsvrc2012_randaug_light1: S/32, Last-2, E=8, 224 px, eval C=4",
            representation_size=512,
            capacity_factor=4.0,
            tags=_RELEASED,
        ),
        _entry(
            _V_S32,
            "vmoe-s32-last2-ilsvrc2012-ft-384",
            "released vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012: 384 px, C=1.5",
            image_size=384,
            capacity_factor=1.5,
            tags=_RELEASED,
        ),
        _entry(
            _V_B16,
            "vmoe-b16-in21k",
            "released vmoe_b16_imagenet21k_randaug_strong: B/16, Every-2, E=8, 21,843 classes, C=1.05",
            num_classes=21843,
            capacity_factor=1.05,
            tags=_RELEASED,
        ),
        _entry(
            _V_B16,
            "vmoe-b16-in21k-ft-ilsvrc2012-384",
            "released vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012: 384 px, C=1.5",
            image_size=384,
            capacity_factor=1.5,
            tags=_RELEASED,
        ),
        _entry(
            _V_B16,
            "vmoe-b16-every2-e32",
            "V-MoE B/16, Every-2, E=32, k=2, JFT-300M head (paper, 979.0M params)",
            num_experts=32,
            num_classes=18291,
            representation_size=768,
        ),
        _entry(_SOFT_S16, "soft-moe-s16-e128", "Soft MoE S/16, E=128, p=1, JFT-4B head (paper, 0.93B params)"),
        _entry(
            {**_SOFT_S16, **_B},
            "soft-moe-b16-e128",
            "Soft MoE B/16, E=128, p=1, JFT-4B head (paper, 3.71B params)",
        ),
        _entry(
            _TINY,
            "vmoe-tiny",
            "tiny V-MoE for tests: 32x32 images, 4x4 patches, D=32, E=4, k=2",
            family=VMOE,
            moe_layers=every(2, 4),
            num_experts=4,
        ),
        _entry(
            {**_TINY, **_SOFT},
            "soft-moe-tiny",
            "tiny Soft-MoE for tests: 32x32 images, 4x4 patches, D=32, E=8, p=2",
            moe_layers=last_half(4),
            num_experts=8,
            slots_per_expert=2,
        ),
    ]
}


ZOO.update(SWIN_MOE_ZOO)  # Swin-MoE (microsoft/Swin-Transformer with tutel): exporter.sources.swin_moe


def config_from_dict(d: dict) -> ModelConfig | SwinMoEConfig:
    """A config written by ``to_dict`` (a graph's or model folder's record), of either kind."""
    return SwinMoEConfig.from_dict(d) if d.get("family") == SWIN_MOE else ModelConfig.from_dict(d)


def get_config(name: str) -> ModelConfig | SwinMoEConfig:
    try:
        return ZOO[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(ZOO), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise UserError(f"unknown model {name!r}; {hint}`moe-export models` lists the zoo") from None


# VisionTransformer's keyword arguments that are the config's fields of the same names
_MODEL_ARGS = ("image_size", "patch_size", "dim", "mlp_dim", "heads", "layers", "num_classes", "moe_layers")
_MODEL_ARGS += ("classifier", "representation_size", "qk_norm", "in_chans")


def build_model(config: ModelConfig, *, seed: int = settings.DEFAULT_SEED, device: str = "cpu"):
    """The PyTorch model of a config, seeded random init, eval mode. ``device="meta"`` allocates nothing."""
    if config.family == SWIN_MOE:
        return build_swin_moe(config, seed=seed, device=device)
    from exporter.models.soft_moe import SoftMoEMlp
    from exporter.models.vit import VisionTransformer
    from exporter.models.vmoe import VMoEMlp

    config.check()
    layer = VMoEMlp if config.family == VMOE else SoftMoEMlp
    # the MoE layer's keyword arguments: its family's routing fields and the bfloat16 dispatch
    routing = config_args(config, (*FAMILY_FIELDS[config.family], "bf16_dispatch"))

    def make_moe(i: int):
        return layer(config.dim, config.mlp_dim, config.num_experts, **routing)

    args = config_args(config, _MODEL_ARGS)
    return seeded_model(lambda: VisionTransformer(**args, make_moe=make_moe), seed=seed, device=device)


def param_count(config: ModelConfig) -> int:
    """Parameters from the papers' formulas (moe-semantics.md §5.1), without building the model."""
    if config.family == SWIN_MOE:
        return swin_moe_param_count(config)
    d, m = config.dim, config.mlp_dim
    mlp = 2 * d * m + m + d
    vit = config.in_chans * config.patch_size**2 * d + d  # patch embedding
    vit += config.tokens * d + (d if config.classifier == "token" else 0)  # position embedding, class token
    block = 4 * d + (4 * d * d + 4 * d) + mlp + (2 * (d // config.heads) if config.qk_norm else 0)
    vit += config.layers * block + 2 * d  # blocks and encoder norm
    rep = config.representation_size
    vit += (d * rep + rep if rep else 0) + (rep or d) * config.num_classes + config.num_classes
    n_moe, e = len(config.moe_layers), config.num_experts
    if config.family == VMOE:
        return vit + n_moe * ((e - 1) * mlp + d * e)
    return vit + n_moe * ((e - 1) * mlp + d * e * config.slots_per_expert + 1)


def zoo_rows() -> list[dict]:
    """One dict per zoo model: name, family, parameters, summary (``moe-export models``)."""
    return [dict(name=c.name, family=c.family, params=param_count(c), summary=c.summary) for c in ZOO.values()]
