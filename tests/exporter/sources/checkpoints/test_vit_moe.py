"""The architecture read off a vmoe parameter tree, and every leaf mapped onto our models: the
fixtures, and the four released models' real trees (names and shapes from jax.eval_shape on vmoe's
own config files) with seeded weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter.errors import UserError
from exporter.sources.checkpoints.vit_moe import infer_architecture, infer_config, matching_release, to_state_dict
from exporter.sources.checkpoints.vmoe_format import read_checkpoint, read_shapes
from exporter.sources.zoo import ZOO, build_model, param_count

from .conftest import FIXTURES, SOFT, VMOE

RELEASED = json.loads((FIXTURES / "released_trees.json").read_text())
ZOO_NAME = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": "vmoe-s32-last2-ilsvrc2012",
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": "vmoe-s32-last2-ilsvrc2012-ft-384",
    "vmoe_b16_imagenet21k_randaug_strong": "vmoe-b16-in21k",
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": "vmoe-b16-in21k-ft-ilsvrc2012-384",
}


def test_fixture_architectures():
    vmoe = infer_architecture(read_shapes(VMOE))
    assert vmoe == dict(
        family="vmoe",
        image_size=32,
        patch_size=8,
        dim=32,
        mlp_dim=64,
        heads=4,
        layers=4,
        moe_layers=(1, 3),
        num_experts=4,
        num_classes=10,
        representation_size=32,
        classifier="token",
        qk_norm=False,
        in_chans=3,
        slots_per_expert=1,
    )
    soft = infer_architecture(read_shapes(SOFT))
    assert soft["family"] == "soft_moe" and soft["classifier"] == "gap" and soft["qk_norm"]
    assert soft["moe_layers"] == (2, 3) and soft["slots_per_expert"] == 2 and soft["representation_size"] is None


def test_unmatched_tree_gets_the_reference_defaults():
    config = infer_config(read_shapes(VMOE))
    assert (config.k, config.capacity_factor, config.batch_priority, config.group_images) == (2, 1.05, False, 8)
    assert not config.bf16_dispatch
    assert infer_config(read_shapes(VMOE), capacity_factor=0.5, group_images=2).capacity_factor == 0.5


@pytest.mark.parametrize("release", sorted(RELEASED))
def test_released_trees_are_recognised_and_mapped(release):
    tree = RELEASED[release]
    shapes = {name: tuple(shape) for name, shape in tree["params"].items()}
    config = infer_config(shapes)
    assert config.name == ZOO_NAME[release] and matching_release(infer_architecture(shapes)) is ZOO[config.name]
    assert config.image_size == tree["image_size"] and config.num_classes == tree["num_classes"]
    assert config.capacity_factor == tree["eval_capacity_factor"]  # the capacity its config evaluates with
    assert param_count(config) == sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    model = build_model(config, device="meta")
    state = to_state_dict(params, config, model)
    assert state.keys() == model.state_dict().keys()
    block = "blocks.1" if config.moe_layers[0] == 1 else f"blocks.{config.moe_layers[0]}"
    moe = f"Encoder/encoderblock_{block.split('.')[1]}/Moe/"
    assert torch.equal(state[f"{block}.mlp.experts.w1"], torch.from_numpy(params[moe + "Mlp/Dense_0/kernel"]))
    assert torch.equal(state[f"{block}.mlp.router.weight"], torch.from_numpy(params[moe + "Router/dense/kernel"].T))
    assert torch.equal(state["embedding.weight"], torch.from_numpy(params["embedding/kernel"].transpose(3, 2, 0, 1)))


def test_every_leaf_used_and_every_parameter_set():
    params, _ = read_checkpoint(VMOE)
    config = infer_config({k: v.shape for k, v in params.items()})
    extra = dict(params, **{"Encoder/encoderblock_0/extra/kernel": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match=r"encoderblock_0/extra/kernel \(not used\)"):
        to_state_dict(extra, config)
    missing = {k: v for k, v in params.items() if k != "Encoder/encoderblock_3/Moe/Router/dense/kernel"}
    with pytest.raises(UserError, match=r"encoderblock_3/Moe/Router/dense/kernel \(missing\)"):
        to_state_dict(missing, config)
    wrong = dict(params, **{"head/bias": np.zeros(11, np.float32)})
    with pytest.raises(UserError, match=r"head/bias \[11\] \(does not fit head.bias \[10\]\)"):
        to_state_dict(wrong, config)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("embedding/kernel"), "no embedding/kernel"),
        (lambda s: s.pop("Encoder/posembed_input/pos_embedding"), "sincos2d"),
        (lambda s: s.update({"Encoder/posembed_input/pos_embedding": (1, 20, 32)}), "not a square grid"),
        (lambda s: [s.pop(k) for k in list(s) if "/Moe/" in k], "dense ViT"),
        (lambda s: s.pop("Encoder/encoderblock_3/Moe/Router/dense/kernel"), "no Router/dense"),
        (lambda s: s.update({"MapHead/probe": (1, 1, 32)}), "MapHead"),
        (lambda s: s.pop("head/kernel"), "no head/kernel"),
    ],
)
def test_trees_that_are_not_a_vit_moe(edit, message):
    shapes = dict(read_shapes(VMOE))
    edit(shapes)
    with pytest.raises(UserError, match=message):
        infer_architecture(shapes)
