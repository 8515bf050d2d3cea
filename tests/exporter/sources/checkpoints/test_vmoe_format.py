"""vmoe's partitioned checkpoint format, read with msgpack and numpy: both index versions, shards,
arrays split across shards, bfloat16 leaves, and one clear line for every broken file."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from exporter.errors import UserError
from exporter.sources.checkpoints.vmoe_format import read_checkpoint, read_index, read_shapes, resolve_prefix

from .conftest import FIXTURES, SOFT, VMOE, VMOE_BF16


def test_reads_every_leaf_of_a_three_shard_checkpoint():
    params, facts = read_checkpoint(VMOE)
    assert facts["shards"] == 3 and facts["version"] == "20220622" and facts["dtypes"] == ["float32"]
    assert params.keys() == read_shapes(VMOE).keys()
    assert params["embedding/kernel"].shape == (8, 8, 3, 32)  # HWIO
    assert params["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"].shape == (4, 32, 64)  # expert axis first
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in params.values())
    assert facts["parameters"] == sum(a.size for a in params.values())


def test_arrays_are_split_across_shards_and_reassembled():
    count, leaves, _ = read_index(VMOE)
    split = [name for name, info in leaves if len(set(info.shards)) > 1]
    assert count == 3 and split, "the fixture must hold arrays whose chunks sit in different shards"
    params, _ = read_checkpoint(VMOE)
    kernel = params["Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel"]
    assert len(np.unique(kernel)) > 0.99 * kernel.size  # no chunk left at zero or written twice


def test_index_without_version_key_reads_the_same(copy_checkpoint):
    old = copy_checkpoint(VMOE, index=FIXTURES / "vmoe_small_v0.index")
    params, facts = read_checkpoint(old)
    assert facts["version"] is None
    expected, _ = read_checkpoint(VMOE)
    assert params.keys() == expected.keys()
    assert all(np.array_equal(params[k], expected[k]) for k in params)


def test_bfloat16_leaves_widen_exactly():
    params, facts = read_checkpoint(VMOE_BF16)
    full, _ = read_checkpoint(VMOE)
    assert facts["dtypes"] == ["bfloat16"]
    for name, value in params.items():
        rounded = torch.from_numpy(full[name]).to(torch.bfloat16).float().numpy()
        assert value.dtype == np.float32 and np.array_equal(value, rounded), name


def test_prefix_or_index_file():
    assert resolve_prefix(f"{VMOE}.index") == resolve_prefix(VMOE) == VMOE
    assert read_shapes(f"{SOFT}.index")["Encoder/encoderblock_2/Moe/Router/mu"] == (32, 4, 2)


def _expect(path, *fragments):
    with pytest.raises(UserError) as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_shard(copy_checkpoint):
    prefix = copy_checkpoint(VMOE)
    Path(f"{prefix}.data-00001-of-00003").unlink()
    _expect(prefix, "missing", "vmoe_small.data-00001-of-00003")


def test_truncated_shard(copy_checkpoint):
    prefix = copy_checkpoint(VMOE)
    shard = Path(f"{prefix}.data-00002-of-00003")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _expect(prefix, "truncated", "vmoe_small.data-00002-of-00003")


def test_corrupt_index(copy_checkpoint):
    prefix = copy_checkpoint(VMOE)
    Path(f"{prefix}.index").write_bytes(b"\x93not an index at all")
    _expect(prefix, "corrupt", "vmoe_small.index")


def test_index_of_another_checkpoint_is_caught(copy_checkpoint):
    prefix = copy_checkpoint(VMOE, index=Path(f"{SOFT}.index"))  # right shard count, wrong leaves
    with pytest.raises(UserError, match="vmoe_small.data-0000"):
        read_checkpoint(prefix)


def test_prefix_that_matches_nothing(tmp_path):
    _expect(tmp_path / "nothing_here", "no vmoe checkpoint", "nothing_here.index")


def test_orbax_folder_is_recognised(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "_METADATA").write_text("{}")
    _expect(tmp_path / "ckpt", "Orbax", "save_checkpoint")


def test_plain_folder(tmp_path):
    _expect(tmp_path, "is a folder")


def test_incomplete_leaf_is_named(copy_checkpoint):
    """A shard that lacks one leaf's chunks (its data elsewhere never written) names that leaf."""
    prefix = copy_checkpoint(VMOE)
    shard = Path(f"{prefix}.data-00000-of-00003")
    content = msgpack.unpackb(shard.read_bytes(), raw=False, strict_map_key=False)
    dropped = next(k for k in content if k != "__msgpack_array_chunk_a87ca2__")
    del content[dropped]
    shard.write_bytes(msgpack.packb(content, use_bin_type=True))
    _, leaves, _ = read_index(prefix)
    _expect(prefix, "incomplete", leaves[int(dropped)][0])


def test_writer_round_trips_and_splits_arrays(tmp_path):
    """write_checkpoint (synthetic checkpoints of real trees; make_fixtures.py checks that vmoe's own
    restore_checkpoint reads it bit for bit) and read_checkpoint agree."""
    from exporter.sources.checkpoints.vmoe_format import write_checkpoint

    params, _ = read_checkpoint(VMOE)
    write_checkpoint(tmp_path / "ours", params, shards=4)
    again, facts = read_checkpoint(tmp_path / "ours")
    assert facts["shards"] == 4 and again.keys() == params.keys()
    assert all(np.array_equal(again[k], params[k]) for k in params)
    _, leaves, _ = read_index(tmp_path / "ours")
    assert any(len(set(info.shards)) > 1 for _, info in leaves)
