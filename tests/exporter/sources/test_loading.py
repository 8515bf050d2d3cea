"""Model sources: zoo and user factories, input shapes, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from exporter.errors import UserError
from exporter.sources.loading import ModelSource, check_batch, from_module, from_zoo, load, parse_shape

FIXTURES = str(Path(__file__).resolve().parents[2] / "fixtures" / "user_modules.py")


@pytest.mark.parametrize("text", ["8,3,32,32", "8x3x32x32", "[8, 3, 32, 32]", "(8,3,32,32)"])
def test_shapes_parse_in_common_spellings(text):
    assert parse_shape(text) == (8, 3, 32, 32)


@pytest.mark.parametrize("text", ["8,3,a,32", "32", "8,3,0,32", ""])
def test_bad_shapes_are_user_errors(text):
    with pytest.raises(UserError, match="input shape"):
        parse_shape(text)


def test_zoo_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="does not match vmoe-tiny, which takes 3x32x32"):
        from_zoo("vmoe-tiny", input_shape=(8, 3, 64, 64))


def test_source_round_trips_through_json():
    source = from_zoo("vmoe-tiny", seed=3, k=1, group_images=1)
    assert ModelSource.from_json(source.to_json()) == source


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (load(from_zoo("soft-moe-tiny", seed=s)).module for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head.weight, c.head.weight)


def test_user_factory_loads_and_is_described():
    loaded = load(from_module(f"{FIXTURES}:tiny_vmoe_user_model", input_shape=(4, 3, 16, 16)))
    assert loaded.family == "vmoe" and loaded.batch_multiple == 2
    assert loaded.routing_layers == ["moe"]


def test_dense_user_factory_has_no_routing():
    loaded = load(from_module(f"{FIXTURES}:plain_cnn", input_shape=(2, 3, 16, 16)))
    assert loaded.family == "dense" and loaded.batch_multiple == 1 and loaded.routing_layers == []


@pytest.mark.parametrize(
    "spec, message",
    [
        (f"{FIXTURES}:not_a_module", "returned int, not a torch.nn.Module"),
        (f"{FIXTURES}:missing_factory", "has no callable 'missing_factory'"),
        (f"{FIXTURES}:broken_factory", "factory .* failed: RuntimeError"),
        ("tests/fixtures/nope.py:build", "does not exist"),
        ("no_such_package.models:build", "importing no_such_package.models failed"),
    ],
)
def test_bad_factories_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        load(from_module(spec, input_shape=(1, 3, 16, 16)))


def test_module_needs_an_input_shape_and_a_factory_name():
    with pytest.raises(UserError, match="needs `input_shape`"):
        from_module(f"{FIXTURES}:plain_cnn", input_shape=None)
    with pytest.raises(UserError, match="must look like"):
        from_module(FIXTURES, input_shape=(1, 3, 16, 16))


def test_safetensors_checkpoint_is_loaded_and_hashed(tmp_path):
    trained = load(from_zoo("vmoe-tiny", seed=7)).module
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    source = from_zoo("vmoe-tiny", seed=0, checkpoint=str(path))
    assert len(source.checkpoint_sha256) == 64
    loaded = load(source).module
    assert torch.equal(loaded.blocks[1].mlp.router.weight, trained.blocks[1].mlp.router.weight)


def test_checkpoint_of_another_model_is_a_user_error(tmp_path):
    other = load(from_zoo("soft-moe-tiny")).module
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(UserError, match="does not fit the model"):
        load(from_zoo("vmoe-tiny", checkpoint=str(path)))


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load(from_zoo("vmoe-tiny", checkpoint=str(path)))


def test_batch_must_be_a_multiple_of_the_routing_group():
    loaded = load(from_zoo("vmoe-tiny"))
    check_batch(16, loaded)
    with pytest.raises(UserError, match="not a multiple of the routing group \\(8 images\\)"):
        check_batch(12, loaded)
