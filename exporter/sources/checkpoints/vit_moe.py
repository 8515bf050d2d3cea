"""vmoe's ``VisionTransformerMoe`` parameter tree -> our ``ModelConfig`` and PyTorch state dict.

The architecture is read off the tree alone (vmoe-checkpoints.md §3): patch size and channels from
the HWIO embedding kernel, image size from the position embedding, heads from the ``[D, H, D/H]``
attention kernels, MoE blocks and experts from ``Moe/Mlp`` (expert axis first), the family from
the router (``Router/dense`` V-MoE, ``Router/mu`` Soft-MoE), class token or GAP, pre-logits,
qk-LayerNorm and the head. What a tree does not hold (k, capacity, BPR, routing groups) comes from
the matching released config, else from the reference configs' defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from exporter.errors import UserError
from exporter.sources.zoo import SOFT_MOE, VMOE, ZOO, ModelConfig

_BLOCK = re.compile(r"^Encoder/encoderblock_(\d+)/")
ARCH_FIELDS = (
    "family",
    "image_size",
    "patch_size",
    "dim",
    "mlp_dim",
    "heads",
    "layers",
    "moe_layers",
    "num_experts",
    "num_classes",
    "representation_size",
    "classifier",
    "qk_norm",
    "in_chans",
    "slots_per_expert",
)


def _need(shapes: Mapping[str, tuple[int, ...]], name: str, what: str) -> tuple[int, ...]:
    if name not in shapes:
        raise UserError(f"not a ViT-MoE parameter tree: no {name} ({what})")
    return tuple(shapes[name])


def infer_architecture(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The architecture fields of ``ModelConfig`` from parameter names and shapes."""
    if any(name.startswith("params/") for name in shapes):
        raise UserError("the tree has a 'params' level: pass the bare parameter dict vmoe checkpoints hold")
    patch_h, patch_w, chans, dim = _need(shapes, "embedding/kernel", "the HWIO patch embedding")
    if patch_h != patch_w:
        raise UserError(f"non-square patches ({patch_h}x{patch_w}) are not supported")
    classifier = "token" if "cls" in shapes else "gap"
    if any(name.startswith("MapHead/") for name in shapes):
        raise UserError("the 'map' classifier (MapHead) is not supported; models with 'token' or 'gap' are")
    if "Encoder/posembed_input/pos_embedding" not in shapes:
        raise UserError("no learned position embedding (Encoder/posembed_input): sincos2d models are not supported")
    tokens = _need(shapes, "Encoder/posembed_input/pos_embedding", "")[1] - (classifier == "token")
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"position embedding of {tokens} patch tokens is not a square grid")
    blocks = sorted({int(m.group(1)) for name in shapes if (m := _BLOCK.match(name))})
    if not blocks or blocks != list(range(len(blocks))):
        raise UserError(f"encoder blocks {blocks[:5]}... are not numbered 0..L-1")
    prefix = "Encoder/encoderblock_{}/".format
    query = _need(shapes, prefix(0) + "SelfAttention/query/kernel", "[D, H, D/H] attention kernel")
    heads = query[1]
    moe_layers = tuple(i for i in blocks if prefix(i) + "Moe/Mlp/Dense_0/kernel" in shapes)
    dense = [i for i in blocks if i not in moe_layers]
    if dense:
        mlp_dim = _need(shapes, prefix(dense[0]) + "Mlp/Dense_0/kernel", "")[1]
    elif moe_layers:
        mlp_dim = shapes[prefix(moe_layers[0]) + "Moe/Mlp/Dense_0/kernel"][2]
    experts, families, slots = set(), set(), set()
    for i in moe_layers:
        experts.add(shapes[prefix(i) + "Moe/Mlp/Dense_0/kernel"][0])
        if prefix(i) + "Moe/Router/dense/kernel" in shapes:
            families.add(VMOE)
        elif prefix(i) + "Moe/Router/mu" in shapes:
            families.add(SOFT_MOE)
            slots.add(shapes[prefix(i) + "Moe/Router/mu"][2])
        else:
            raise UserError(f"block {i} has experts but no Router/dense (V-MoE) or Router/mu (Soft-MoE)")
    if not moe_layers:
        raise UserError("the tree has no MoE blocks (Encoder/encoderblock_i/Moe): it is a dense ViT")
    if len(families) > 1 or len(experts) > 1 or len(slots) > 1:
        raise UserError("MoE blocks differ in router kind, experts or slots; one kind per model is supported")
    rep = shapes.get("pre_logits/kernel")
    head = _need(shapes, "head/kernel", "the classification head")
    return dict(
        family=families.pop(),
        image_size=side * patch_h,
        patch_size=patch_h,
        dim=dim,
        mlp_dim=mlp_dim,
        heads=heads,
        layers=len(blocks),
        moe_layers=moe_layers,
        num_experts=experts.pop(),
        num_classes=head[1],
        representation_size=rep[1] if rep else None,
        classifier=classifier,
        qk_norm=prefix(0) + "SelfAttention/query_ln/scale" in shapes,
        in_chans=chans,
        slots_per_expert=slots.pop() if slots else 1,
    )


def architecture_of(config: ModelConfig) -> dict:
    return {f: getattr(config, f) for f in ARCH_FIELDS}


def matching_release(arch: dict) -> ModelConfig | None:
    """The released zoo config with exactly this architecture, if any."""
    for config in ZOO.values():
        if "released" in config.tags and config.family in (VMOE, SOFT_MOE) and architecture_of(config) == arch:
            return config
    return None


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], *, name: str | None = None, checkpoint: str = "checkpoint", **overrides
) -> ModelConfig:
    """A ``ModelConfig`` for this tree: a released config's (and its name) when the architecture is
    one of them, else the reference configs' defaults, named after the family and ``checkpoint`` (the
    prefix's file name): ``vmoe-<checkpoint>`` or ``soft-moe-<checkpoint>``; then ``name`` and the
    non-``None`` overrides."""
    arch = infer_architecture(shapes)
    release = matching_release(arch)
    if release is not None:
        config = release
    else:
        family, slug = ("V-MoE", "vmoe") if arch["family"] == VMOE else ("Soft-MoE", "soft-moe")
        default = f"{slug}-{re.sub(r'[^A-Za-z0-9_.-]', '_', checkpoint)}"  # a Triton model name too
        config = ModelConfig(default, summary=f"imported vmoe checkpoint {checkpoint} ({family})", **arch)
    return config.replace(name=name, **overrides)


def _dense(kernel: np.ndarray) -> np.ndarray:
    return kernel.T  # Flax Dense (in, out) -> torch Linear (out, in)


def parameter_map(config: ModelConfig) -> dict[str, tuple[str | tuple[str, ...], Callable]]:
    """torch state-dict name -> (leaf name(s), function of the leaf array(s))."""
    d = config.dim
    m: dict[str, tuple] = {
        "embedding.weight": ("embedding/kernel", lambda k: k.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "embedding.bias": ("embedding/bias", None),
        "pos_embedding": ("Encoder/posembed_input/pos_embedding", None),
        "encoder_norm.weight": ("Encoder/encoder_norm/scale", None),
        "encoder_norm.bias": ("Encoder/encoder_norm/bias", None),
        "head.weight": ("head/kernel", _dense),
        "head.bias": ("head/bias", None),
    }
    if config.classifier == "token":
        m["cls"] = ("cls", None)
    if config.representation_size:
        m["pre_logits.weight"] = ("pre_logits/kernel", _dense)
        m["pre_logits.bias"] = ("pre_logits/bias", None)
    for i in range(config.layers):
        src, dst = f"Encoder/encoderblock_{i}/", f"blocks.{i}."
        att = src + "SelfAttention/"
        qkv = tuple(att + f"{p}/kernel" for p in ("query", "key", "value"))
        m[dst + "norm1.weight"] = (src + "LayerNorm_0/scale", None)
        m[dst + "norm1.bias"] = (src + "LayerNorm_0/bias", None)
        m[dst + "norm2.weight"] = (src + "LayerNorm_1/scale", None)
        m[dst + "norm2.bias"] = (src + "LayerNorm_1/bias", None)
        m[dst + "attn.qkv.weight"] = (qkv, lambda *ks: np.concatenate([k.reshape(d, d).T for k in ks]))
        m[dst + "attn.qkv.bias"] = (
            tuple(att + f"{p}/bias" for p in ("query", "key", "value")),
            lambda *bs: np.concatenate([b.reshape(d) for b in bs]),
        )
        m[dst + "attn.out.weight"] = (att + "out/kernel", lambda k: k.reshape(d, d).T)
        m[dst + "attn.out.bias"] = (att + "out/bias", None)
        if config.qk_norm:
            m[dst + "attn.q_norm.weight"] = (att + "query_ln/scale", None)
            m[dst + "attn.k_norm.weight"] = (att + "key_ln/scale", None)
        if i in config.moe_layers:
            moe = src + "Moe/"
            m[dst + "mlp.experts.w1"] = (moe + "Mlp/Dense_0/kernel", None)
            m[dst + "mlp.experts.b1"] = (moe + "Mlp/Dense_0/bias", None)
            m[dst + "mlp.experts.w2"] = (moe + "Mlp/Dense_1/kernel", None)
            m[dst + "mlp.experts.b2"] = (moe + "Mlp/Dense_1/bias", None)
            if config.family == VMOE:
                m[dst + "mlp.router.weight"] = (moe + "Router/dense/kernel", _dense)
            else:
                m[dst + "mlp.router.mu"] = (moe + "Router/mu", None)
                m[dst + "mlp.router.scale"] = (moe + "Router/scale", None)
        else:
            m[dst + "mlp.fc1.weight"] = (src + "Mlp/Dense_0/kernel", _dense)
            m[dst + "mlp.fc1.bias"] = (src + "Mlp/Dense_0/bias", None)
            m[dst + "mlp.fc2.weight"] = (src + "Mlp/Dense_1/kernel", _dense)
            m[dst + "mlp.fc2.bias"] = (src + "Mlp/Dense_1/bias", None)
    return m


def to_state_dict(params: Mapping[str, np.ndarray], config: ModelConfig, module=None) -> dict:
    """The torch state dict of ``config``'s model from the tree's leaves. Every leaf is used and
    every parameter set with its exact shape, or one line names what did not fit."""
    import torch

    from exporter.sources.zoo import build_model

    expected = {k: tuple(v.shape) for k, v in (module or build_model(config, device="meta")).state_dict().items()}
    mapping = parameter_map(config)
    used: set[str] = set()
    state, misfits = {}, []
    for key, (leaves, fn) in mapping.items():
        names = (leaves,) if isinstance(leaves, str) else leaves
        missing = [n for n in names if n not in params]
        if missing:
            misfits.append(f"{missing[0]} (missing)")
            continue
        used.update(names)
        arrays = [params[n] for n in names]
        value = fn(*arrays) if fn else arrays[0]
        if key not in expected or tuple(value.shape) != expected[key]:
            misfits.append(f"{names[0]} {list(arrays[0].shape)} (does not fit {key} {list(expected.get(key, ()))})")
            continue
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    unused = sorted(set(params) - used)
    unset = sorted(set(expected) - set(mapping))  # mapped keys that failed are misfits already
    if unused:
        misfits += [f"{n} (not used)" for n in unused]
    if unset:
        misfits += [f"{k} (no leaf)" for k in unset]
    if misfits:
        more = f" and {len(misfits) - 3} more" if len(misfits) > 3 else ""
        raise UserError(f"the checkpoint does not fit {config.name}: {'; '.join(misfits[:3])}{more}")
    return state
