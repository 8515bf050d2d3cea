"""Swin-MoE configs: Swin's own YAML (``MODEL.SWIN_MOE.*``, ``DATA.IMG_SIZE``, ``MODEL.NUM_CLASSES``) as a
``SwinMoEConfig``, the released configs as zoo entries, and the model a config builds.

Defaults are Swin-Transformer's ``config.py`` (the values a YAML leaves out); the number of global experts
is not in a YAML (``NUM_LOCAL_EXPERTS`` counts per GPU of the training run) and comes from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from exporter import settings
from exporter.errors import UserError

SWIN_MOE = "swin_moe"
# Swin-Transformer/config.py: _C.MODEL.SWIN_MOE defaults (and DATA.IMG_SIZE, MODEL.NUM_CLASSES)
YAML_DEFAULTS = {
    "PATCH_SIZE": 4,
    "IN_CHANS": 3,
    "EMBED_DIM": 96,
    "DEPTHS": [2, 2, 6, 2],
    "NUM_HEADS": [3, 6, 12, 24],
    "WINDOW_SIZE": 7,
    "MLP_RATIO": 4.0,
    "QKV_BIAS": True,
    "QK_SCALE": None,
    "APE": False,
    "PATCH_NORM": True,
    "MLP_FC2_BIAS": True,
    "PRETRAINED_WINDOW_SIZES": [0, 0, 0, 0],
    "MOE_BLOCKS": [[-1], [-1], [-1], [-1]],
    "NUM_LOCAL_EXPERTS": 1,
    "TOP_VALUE": 1,
    "CAPACITY_FACTOR": 1.25,
    "COSINE_ROUTER": False,
    "NORMALIZE_GATE": False,
    "USE_BPR": True,
    "COSINE_ROUTER_DIM": 256,
    "COSINE_ROUTER_INIT_T": 0.5,
}
DEFAULT_IMAGE_SIZE, DEFAULT_NUM_CLASSES = 224, 1000
# Swin's data/build.py sets MODEL.NUM_CLASSES from DATA.DATASET at run time; the released YAMLs rely on it.
DATASET_CLASSES = {"imagenet": 1000, "imagenet22K": 21841}


@dataclass(frozen=True)
class SwinMoEConfig:
    """A Swin-MoE model: Swin's ``MODEL.SWIN_MOE`` settings, the image size, the classes and the global
    experts. Routing: ``k`` (``TOP_VALUE``), ``capacity_factor``, ``batch_priority`` (``USE_BPR``),
    ``normalize_gate`` and tutel's capacity ``alignment`` (1 on one device); the routing group is the batch."""

    name: str
    summary: str
    image_size: int
    num_classes: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    moe_blocks: tuple[tuple[int, ...], ...]
    num_experts: int
    patch_size: int = 4
    in_chans: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    ape: bool = False
    patch_norm: bool = True
    mlp_fc2_bias: bool = True
    pretrained_window_sizes: tuple[int, ...] = ()
    cosine_router: bool = False
    cosine_router_dim: int = 256
    cosine_router_init_t: float = 0.5
    k: int = 1
    capacity_factor: float = 1.25
    batch_priority: bool = True
    normalize_gate: bool = False
    alignment: int = 1
    family: str = SWIN_MOE
    tags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    @property
    def batch_multiple(self) -> int:
        return 1  # the routing group is whatever batch is given

    @property
    def preprocessing(self) -> str:
        return settings.SWIN_MOE_PREPROCESSING

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) from [0, 1] pixels to the inputs: ImageNet's."""
        return settings.IMAGENET_MEAN, settings.IMAGENET_STD

    def stage_tokens(self, stage: int) -> int:
        """Tokens per image in stage ``stage``."""
        return (self.image_size // self.patch_size // 2**stage) ** 2

    def moe_layer_names(self) -> list[str]:
        blocks = self.moe_blocks
        return [f"layers.{i}.blocks.{j}.mlp" for i, stage in enumerate(blocks) for j in sorted(stage) if j >= 0]

    def replace(self, **overrides) -> SwinMoEConfig:
        """A copy with the non-``None`` overrides applied and checked (``k``, ``capacity_factor``,
        ``batch_priority``, or any other field); V-MoE-only settings are refused."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            why = {"group_images": "its routing group is the whole batch", "bf16_dispatch": "tutel dispatches in FP32"}
            reasons = "; ".join(f"{u} ({why[u]})" if u in why else u for u in unknown)
            raise UserError(f"{reasons}: not a setting of Swin-MoE model {self.name}")
        config = dataclasses.replace(self, **overrides)
        config.check()
        return config

    def check(self) -> None:
        stages = len(self.depths)
        if not (len(self.num_heads) == len(self.moe_blocks) == stages) or stages < 1:
            raise UserError(f"{self.name}: DEPTHS, NUM_HEADS and MOE_BLOCKS must have one entry per stage")
        if self.pretrained_window_sizes and len(self.pretrained_window_sizes) != stages:
            raise UserError(f"{self.name}: PRETRAINED_WINDOW_SIZES must have one entry per stage")
        if self.image_size % self.patch_size:
            raise UserError(f"{self.name}: image size {self.image_size} is not a multiple of the patch size")
        for i, (depth, heads, blocks) in enumerate(zip(self.depths, self.num_heads, self.moe_blocks)):
            side, dim = self.image_size // self.patch_size // 2**i, self.embed_dim * 2**i
            window = min(self.window_size, side)
            if side % window or (i < stages - 1 and side % 2):
                raise UserError(f"{self.name}: stage {i} has {side}x{side} tokens, not whole windows of {window}")
            if dim % heads or dim % 2:
                raise UserError(f"{self.name}: stage {i} width {dim} does not split into {heads} heads (or is odd)")
            bad = [b for b in blocks if b != -1 and not 0 <= b < depth]
            if bad:
                raise UserError(f"{self.name}: MOE_BLOCKS of stage {i} names blocks {bad} of {depth}")
        if not self.moe_layer_names():
            raise UserError(f"{self.name}: MOE_BLOCKS names no MoE block: a dense Swin, not a Swin-MoE")
        if not 1 <= self.k <= self.num_experts:
            raise UserError(f"k must be between 1 and the number of experts ({self.num_experts}), got {self.k}")
        if not math.isfinite(self.capacity_factor):
            raise UserError(f"capacity factor must be finite, got {self.capacity_factor}")
        if self.alignment < 1:
            raise UserError(f"alignment must be at least 1, got {self.alignment}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("tags")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SwinMoEConfig:
        d = dict(d)
        for key in ("depths", "num_heads", "pretrained_window_sizes"):
            d[key] = tuple(d.get(key, ()))
        d["moe_blocks"] = tuple(tuple(b) for b in d["moe_blocks"])
        return cls(**d)


def from_yaml(path: str | Path, *, num_experts: int, name: str | None = None) -> tuple[SwinMoEConfig, dict]:
    """The config of Swin's YAML file (``BASE`` files first, as Swin's ``_update_config_from_file``) for a
    checkpoint with ``num_experts`` global experts, and the YAML's ``MODEL.SWIN_MOE`` section as read
    (``NUM_LOCAL_EXPERTS`` tells how the training run split the experts over its GPUs)."""
    import yaml

    path = Path(path)
    merged = _read_yaml(path, yaml, seen=())
    model = merged.get("MODEL", {})
    if model.get("TYPE") != SWIN_MOE:
        raise UserError(f"{path} is not a Swin-MoE config: MODEL.TYPE is {model.get('TYPE')!r}, not 'swin_moe'")
    swin = {**YAML_DEFAULTS, **model.get("SWIN_MOE", {})}
    data = merged.get("DATA", {})
    classes = model.get("NUM_CLASSES", DATASET_CLASSES.get(data.get("DATASET"), DEFAULT_NUM_CLASSES))
    try:
        config = SwinMoEConfig(
            name=name or model.get("NAME") or path.stem,
            summary=f"Swin-MoE from {path.name}",
            image_size=int(data.get("IMG_SIZE", DEFAULT_IMAGE_SIZE)),
            num_classes=int(classes),
            embed_dim=int(swin["EMBED_DIM"]),
            depths=tuple(int(d) for d in swin["DEPTHS"]),
            num_heads=tuple(int(h) for h in swin["NUM_HEADS"]),
            window_size=int(swin["WINDOW_SIZE"]),
            moe_blocks=tuple(tuple(int(b) for b in blocks) for blocks in swin["MOE_BLOCKS"]),
            num_experts=int(num_experts),
            patch_size=int(swin["PATCH_SIZE"]),
            in_chans=int(swin["IN_CHANS"]),
            mlp_ratio=float(swin["MLP_RATIO"]),
            qkv_bias=bool(swin["QKV_BIAS"]),
            qk_scale=None if swin["QK_SCALE"] is None else float(swin["QK_SCALE"]),
            ape=bool(swin["APE"]),
            patch_norm=bool(swin["PATCH_NORM"]),
            mlp_fc2_bias=bool(swin["MLP_FC2_BIAS"]),
            pretrained_window_sizes=tuple(int(w) for w in swin["PRETRAINED_WINDOW_SIZES"])[: len(swin["DEPTHS"])],
            cosine_router=bool(swin["COSINE_ROUTER"]),
            cosine_router_dim=int(swin["COSINE_ROUTER_DIM"]),
            cosine_router_init_t=float(swin["COSINE_ROUTER_INIT_T"]),
            k=int(swin["TOP_VALUE"]),
            capacity_factor=float(swin["CAPACITY_FACTOR"]),
            batch_priority=bool(swin["USE_BPR"]),
            normalize_gate=bool(swin["NORMALIZE_GATE"]),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: a MODEL.SWIN_MOE value has the wrong type ({e})") from None
    config.check()
    return config, swin


def _read_yaml(path: Path, yaml, seen: tuple) -> dict:
    if path in seen:
        raise UserError(f"{path} includes itself through BASE")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a Swin config (a YAML mapping with MODEL and DATA)")
    merged: dict = {}
    for base in data.get("BASE") or []:
        if base:
            merged = _deep_merge(merged, _read_yaml(path.parent / base, yaml, (*seen, path)))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _released(size: str, dim: int, heads: tuple[int, ...], experts: int, cosine: bool = False) -> SwinMoEConfig:
    kind = f"{'cosine_router_' if cosine else ''}{experts}expert"
    released = f"swin_moe_{size}_patch4_window12_192_{kind}_32gpu_22k"
    router = "cosine" if cosine else "linear"
    return SwinMoEConfig(
        name=f"swin-moe-{size[0]}-e{experts}{'-cosine' if cosine else ''}",
        summary=f"{released}: E={experts}, {router} router, k=1, C=1.25, BPR, 192 px"
        + (" (config only, no weights)" if size == "base" else ""),
        image_size=192,
        num_classes=21841,
        embed_dim=dim,
        depths=(2, 2, 18, 2),
        num_heads=heads,
        window_size=12,
        moe_blocks=((-1,), (-1,), (1, 3, 5, 7, 9, 11, 13, 15, 17), (1,)),
        num_experts=experts,
        mlp_fc2_bias=False,
        pretrained_window_sizes=(0, 0, 0, 0),
        cosine_router=cosine,
        tags=("released", released),
    )


_S, _B = ("small", 96, (3, 6, 12, 24)), ("base", 128, (4, 8, 16, 32))
SWIN_MOE_ZOO: dict[str, SwinMoEConfig] = {
    c.name: c
    for c in [
        *(_released(*size, e) for size in (_S, _B) for e in (8, 16, 32)),
        *(_released(*size, 32, cosine=True) for size in (_S, _B)),
        SwinMoEConfig(
            name="swin-moe-tiny",
            summary="tiny Swin-MoE for tests: 32x32 images, windows of 4, D=8, MoE in 2 blocks, E=4, k=1",
            image_size=32,
            num_classes=10,
            embed_dim=8,
            depths=(2, 1),
            num_heads=(1, 2),
            window_size=4,
            mlp_ratio=2.0,
            moe_blocks=((1,), (0,)),
            num_experts=4,
            mlp_fc2_bias=False,
            pretrained_window_sizes=(0, 0),
            tags=("tiny",),
        ),
    ]
}


def matching_config(config: SwinMoEConfig) -> SwinMoEConfig | None:
    """The zoo entry with exactly this architecture and routing, if any."""
    strip = dict(name="", summary="")
    for entry in SWIN_MOE_ZOO.values():
        if dataclasses.replace(entry, **strip) == dataclasses.replace(config, **strip):
            return entry
    return None


def config_args(config, names: tuple[str, ...]) -> dict:
    """The named fields of a config, as the keyword arguments (of the same names) of the module it builds."""
    return {name: getattr(config, name) for name in names}


def seeded_model(make, *, seed: int, device: str):
    """The model ``make()`` builds on ``device``, initialised from ``seed`` unless on ``"meta"`` (which
    allocates nothing), in eval mode: the last step of building a config's model, of either kind."""
    import torch

    with torch.device(device):
        model = make()
    if str(device) != "meta":
        model.init_(torch.Generator(device=device).manual_seed(seed))
    return model.eval()


# SwinTransformerMoE's keyword arguments that are the config's fields of the same names, as they are
_MODEL_ARGS = (
    *("image_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads", "window_size"),
    *("mlp_ratio", "qkv_bias", "qk_scale", "ape", "patch_norm", "mlp_fc2_bias", "moe_blocks", "num_experts"),
    *("k", "capacity_factor", "batch_priority", "normalize_gate"),
    *("cosine_router", "cosine_router_dim", "cosine_router_init_t", "alignment"),
)


def build_swin_moe(config: SwinMoEConfig, *, seed: int = settings.DEFAULT_SEED, device: str = "cpu"):
    """The PyTorch model of a config, seeded random init, eval mode. ``device="meta"`` allocates nothing."""
    from exporter.models.swin_moe import SwinTransformerMoE

    config.check()
    args = config_args(config, _MODEL_ARGS)
    windows = config.pretrained_window_sizes or None
    return seeded_model(lambda: SwinTransformerMoE(**args, pretrained_window_sizes=windows), seed=seed, device=device)


def swin_moe_param_count(config: SwinMoEConfig) -> int:
    """Parameters of the model a config builds, from the architecture (no model built)."""
    heads_mlp = 2 * 512 + 512  # cpb_mlp: Linear(2, 512) with bias; then Linear(512, heads) without
    total = config.in_chans * config.patch_size**2 * config.embed_dim + config.embed_dim
    total += 2 * config.embed_dim if config.patch_norm else 0
    total += config.stage_tokens(0) * config.embed_dim if config.ape else 0
    for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
        d = config.embed_dim * 2**i
        m = int(d * config.mlp_ratio)
        fc2_bias = d if config.mlp_fc2_bias else 0
        for j in range(depth):
            total += 4 * d  # two LayerNorms
            total += 3 * d * d + (3 * d if config.qkv_bias else 0) + d * d + d + heads_mlp + 512 * heads
            if j in config.moe_blocks[i]:
                e = config.num_experts
                router = d * e if not config.cosine_router else d * config.cosine_router_dim + config.cosine_router_dim
                router += config.cosine_router_dim * e + 1 if config.cosine_router else 0
                total += router + e * (2 * m * d + m + fc2_bias)
            else:
                total += 2 * m * d + m + fc2_bias
        if i < len(config.depths) - 1:
            total += 4 * d * 2 * d + 2 * 4 * d  # patch merging: reduction (no bias), LayerNorm
    features = config.embed_dim * 2 ** (len(config.depths) - 1)
    return total + 2 * features + features * config.num_classes + config.num_classes
