"""vmoe's partitioned checkpoints, read with msgpack and numpy alone (no JAX, no TensorFlow).

Written from ``vmoe/checkpoints/{partitioned,serialization,types,base}.py`` of
google-research/vmoe:

- ``PREFIX.index``: one msgpack map ``{"shard_count": N, "index": tree, "version": "20220622"}``
  (no ``version`` before 2022-06). Each leaf of ``tree`` is an IndexInfo extension object: the
  global shaped array (shape, dtype name, weak type), the chunk slices and the shard of each.
- ``PREFIX.data-nnnnn-of-NNNNN``: one msgpack map per shard, a marker key and, per leaf id, a list
  of chunks ``[sub-chunks, slice]``; the 1-D sub-chunks (ndarray extension objects) concatenated
  and reshaped fill that slice of the global array.
- Leaf ids number the leaves in ``jax.tree_util.tree_flatten`` order of the index tree: nested
  dicts, keys sorted at every level (the same order in both versions of the index).

Shards are read one at a time, so peak memory stays near one copy of the weights plus one shard.

A checkpoint is data someone handed over: before anything is allocated, the index must describe each
array as chunks that tile it exactly (no overlap, no gap: refused naming the array), every shard file
must be large enough for the chunks the index places in it, and nesting, counts and dimensions are
bounded (``settings.MAX_CHECKPOINT_*``); each shard must then hold exactly the chunks the index gives it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter import settings
from exporter.errors import UserError

log = logging.getLogger(__name__)

ARRAY_CHUNKS_KEY = "__msgpack_array_chunk_a87ca2__"
# msgpack extension codes of flax.serialization and vmoe.checkpoints.serialization
EXT_NDARRAY, EXT_SHAPED_ARRAY, EXT_SLICE, EXT_SLICE_ND, EXT_INDEX_INFO = 1, 4, 5, 6, 8
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "_sharding")


@dataclass(frozen=True)
class Slice:
    start: int | None
    stop: int | None
    step: int | None


@dataclass(frozen=True)
class IndexInfo:
    shape: tuple[int, ...]
    dtype: str
    slices: tuple[tuple[Slice, ...], ...]
    shards: tuple[int, ...]


class _Corrupt(Exception):
    pass


def _unpack(data: bytes):
    import msgpack

    return msgpack.unpackb(data, raw=True)


def _slice_nd(data: bytes) -> tuple[Slice, ...]:
    return tuple(Slice(*_unpack(s)) for s in _unpack(data))


def _index_ext(code: int, data: bytes):
    if code == EXT_INDEX_INFO:
        shaped, slices, shards = _unpack(data)
        shape, dtype, _weak_type, _ = _unpack(shaped)
        return IndexInfo(tuple(shape), dtype.decode(), tuple(_slice_nd(s) for s in slices), tuple(shards))
    if code == EXT_SLICE_ND:
        return _slice_nd(data)
    if code == EXT_SLICE:
        return Slice(*_unpack(data))
    raise _Corrupt(f"unexpected msgpack extension type {code}")


def _shard_ext(code: int, data: bytes):
    if code == EXT_NDARRAY:
        shape, dtype, buffer = _unpack(data)
        dtype = dtype.decode()
        return dtype, tuple(shape), buffer
    if code == EXT_SLICE_ND:
        return _slice_nd(data)
    if code == EXT_SLICE:
        return Slice(*_unpack(data))
    raise _Corrupt(f"unexpected msgpack extension type {code}")


def _storage_dtype(name: str) -> np.dtype:
    """numpy dtype holding the raw bytes (bfloat16 as uint16 until it is widened)."""
    if name == "bfloat16":
        return np.dtype(np.uint16)
    try:
        return np.dtype(name)
    except TypeError:
        raise _Corrupt(f"unknown dtype {name!r}") from None


def _widen(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 for every floating leaf: bfloat16 bits shifted into float32's upper half (exact)."""
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    return array


def resolve_prefix(path: str | Path) -> Path:
    """The checkpoint prefix of ``PREFIX`` or ``PREFIX.index``; one clear line when there is none."""
    p = Path(path)
    if p.is_dir():
        if any((p / marker).exists() for marker in ORBAX_MARKERS):
            raise UserError(
                f"{p} is an Orbax checkpoint, which moe-export does not read: restore it with "
                "orbax.checkpoint and write it with vmoe.checkpoints.partitioned.save_checkpoint(PREFIX, params)"
            )
        raise UserError(f"{p} is a folder, not a vmoe checkpoint prefix (PREFIX with PREFIX.index beside it)")
    prefix = p.with_suffix("") if p.suffix == ".index" else p
    if not Path(f"{prefix}.index").is_file():
        raise UserError(f"no vmoe checkpoint at {prefix}: {prefix}.index does not exist")
    return prefix


def is_vmoe_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".index" and p.is_file() or Path(f"{p}.index").is_file()


def shard_path(prefix: Path, shard: int, count: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{count:05d}")


def _flatten(tree, path: tuple[str, ...] = ()) -> list[tuple[str, object]]:
    """(``a/b/c``, leaf) in jax.tree_util's order: dict keys sorted at every level."""
    if len(path) > settings.MAX_CHECKPOINT_DEPTH:
        raise _Corrupt(f"the tree nests deeper than {settings.MAX_CHECKPOINT_DEPTH} levels at {'/'.join(path[:4])}/...")
    if isinstance(tree, dict):
        out = []
        for key in sorted(tree, key=str):
            out += _flatten(tree[key], (*path, str(key)))
        return out
    if tree is None:
        return []
    return [("/".join(path), tree)]


def _region(info: IndexInfo, slices: tuple) -> tuple[tuple[int, int], ...]:
    """A chunk's ``((start, stop), ...)`` per dimension, checked to lie inside the array."""
    if not isinstance(slices, tuple) or len(slices) != len(info.shape):
        raise _Corrupt(
            f"a chunk of {len(slices) if isinstance(slices, tuple) else '?'} dims in a {len(info.shape)}-d array"
        )
    region = []
    for s, size in zip(slices, info.shape):
        if (
            not isinstance(s, Slice)
            or s.step not in (None, 1)
            or not all(isinstance(v, int) for v in (s.start, s.stop))
        ):
            raise _Corrupt(f"a chunk slice {s} is not a contiguous start:stop")
        if not 0 <= s.start < s.stop <= size:
            raise _Corrupt(f"a chunk slice {s.start}:{s.stop} lies outside the dimension of {size}")
        region.append((s.start, s.stop))
    return tuple(region)


def _check_tiling(name: str, info: IndexInfo) -> list[tuple[tuple[int, int], ...]]:
    """The chunks of one array, which must cover every element exactly once (overlaps and gaps
    refused, naming the array); returns each chunk's region."""
    if len(info.slices) > settings.MAX_CHECKPOINT_CHUNKS:
        raise _Corrupt(
            f"{name} is split into {len(info.slices):,} chunks; the limit is {settings.MAX_CHECKPOINT_CHUNKS:,}"
        )
    try:
        regions = [_region(info, s) for s in info.slices]
    except _Corrupt as e:
        raise _Corrupt(f"{name}: {e}") from None
    if len(set(regions)) < len(regions):
        raise _Corrupt(f"{name} lists one chunk twice: its chunks overlap")
    total = int(np.prod(info.shape, dtype=object))
    covered = sum(int(np.prod([b - a for a, b in r], dtype=object)) for r in regions)
    if len(regions) > 1:
        box = np.array(regions, dtype=np.int64)  # [chunks, dims, (start, stop)]
        lo, hi = box[:, :, 0], box[:, :, 1]
        apart = (lo[:, None] >= hi[None]) | (lo[None] >= hi[:, None])  # separated along some dimension
        meet = ~apart.any(axis=2)
        np.fill_diagonal(meet, False)
        if meet.any():
            raise _Corrupt(f"{name}: its chunks overlap (two of its {len(regions)} chunks share elements)")
    if covered != total:
        raise _Corrupt(f"{name}: its chunks leave a gap ({total - covered:,} of {total:,} elements in no chunk)")
    return regions


def read_index(prefix: Path) -> tuple[int, list[tuple[str, IndexInfo]], str | None]:
    """(shard count, [(name, IndexInfo)] in leaf-id order, version or None), every array checked to be
    tiled exactly by its chunks and every shard file checked to be large enough for the chunks the
    index places in it (``check_shard_sizes``), before anything is allocated."""
    import msgpack

    index_path = Path(f"{prefix}.index")
    try:
        content = msgpack.unpackb(index_path.read_bytes(), ext_hook=_index_ext, raw=False, strict_map_key=False)
        if not isinstance(content, dict) or "index" not in content or "shard_count" not in content:
            raise _Corrupt("no 'index' and 'shard_count' keys")
        count, version = content["shard_count"], content.get("version")
        if not isinstance(count, int) or not 1 <= count <= settings.MAX_CHECKPOINT_SHARDS:
            raise _Corrupt(f"shard count {count!r} (1 to {settings.MAX_CHECKPOINT_SHARDS:,})")
        leaves = _flatten(content["index"])
        if len(leaves) > settings.MAX_CHECKPOINT_LEAVES:
            raise _Corrupt(f"{len(leaves):,} arrays; the limit is {settings.MAX_CHECKPOINT_LEAVES:,}")
        for name, leaf in leaves:
            if not isinstance(leaf, IndexInfo):
                raise _Corrupt(f"leaf {name} is not an index entry")
            if len(leaf.shape) > settings.MAX_TENSOR_DIMS or not all(
                isinstance(d, int) and 0 <= d < 2**48 for d in leaf.shape
            ):
                raise _Corrupt(f"{name} has the shape {list(leaf.shape)}")
            if any(not (isinstance(s, int) and 0 <= s < count) for s in leaf.shards) or len(leaf.shards) != len(
                leaf.slices
            ):
                raise _Corrupt(f"leaf {name} names shards outside 0..{count - 1}")
            _storage_dtype(leaf.dtype)
            _check_tiling(name, leaf)
    except (_Corrupt, ValueError, TypeError, msgpack.UnpackException) as e:
        raise UserError(f"corrupt vmoe checkpoint index {index_path}: {e}") from None
    check_shard_sizes(prefix, count, leaves)
    return count, leaves, version


def check_shard_sizes(prefix: Path, count: int, leaves: list[tuple[str, IndexInfo]]) -> None:
    """Every shard file exists and holds at least the bytes of the chunks the index places in it, so
    an index that declares more data than its shards hold (a 4 TiB array) is refused before any
    allocation, naming the shard."""
    need = [0] * count
    for _, info in leaves:
        itemsize = _storage_dtype(info.dtype).itemsize
        for slices, shard in zip(info.slices, info.shards):
            need[shard] += int(np.prod([s.stop - s.start for s in slices], dtype=object)) * itemsize
    for shard, want in enumerate(need):
        file = shard_path(prefix, shard, count)
        if not file.is_file():
            raise UserError(f"vmoe checkpoint shard {file} is missing")
        if (size := file.stat().st_size) < want:
            raise UserError(
                f"vmoe checkpoint shard {file} is truncated or not this index's: it has {size:,} bytes, fewer "
                f"than the {want:,} bytes of array data the index places in it"
            )


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """All leaves of a vmoe checkpoint as ``{"Encoder/encoderblock_0/.../kernel": array}``, floating
    leaves widened to float32, and facts about it (prefix, version, shards, dtypes). Each shard must
    hold exactly the chunks the index assigns it, each once: a chunk written twice, or one never
    written, is refused naming the array."""
    import msgpack

    prefix = resolve_prefix(path)
    count, leaves, version = read_index(prefix)  # tiling and shard sizes checked: allocation is bounded
    pending: dict[tuple[int, int], set] = {}  # (leaf, shard) -> regions still to read
    for leaf, (_, info) in enumerate(leaves):
        for slices, shard in zip(info.slices, info.shards):
            pending.setdefault((leaf, shard), set()).add(_region(info, slices))
    arrays = [np.zeros(info.shape, _storage_dtype(info.dtype)) for _, info in leaves]
    for shard in range(count):
        file = shard_path(prefix, shard, count)
        log.info(f"reading {file.name} ({shard + 1}/{count})")
        if not file.is_file():
            raise UserError(f"vmoe checkpoint shard {file} is missing")
        try:
            content = msgpack.unpackb(file.read_bytes(), ext_hook=_shard_ext, raw=False, strict_map_key=False)
            if not isinstance(content, dict) or ARRAY_CHUNKS_KEY not in content:
                raise _Corrupt("not an array-chunks map")
            for key, chunks in content.items():
                if key == ARRAY_CHUNKS_KEY:
                    continue
                leaf = int(key)
                if not 0 <= leaf < len(leaves):
                    raise _Corrupt(f"leaf id {leaf} is not in the index")
                name, info = leaves[leaf]
                target = arrays[leaf]
                for subchunks, slices in chunks:
                    if any(dtype != info.dtype for dtype, _, _ in subchunks):
                        raise _Corrupt(f"{name}: a chunk's dtype differs from the index's {info.dtype}")
                    region = _region(info, slices)
                    if region not in pending.get((leaf, shard), ()):
                        where = ", ".join(f"{a}:{b}" for a, b in region)
                        raise _Corrupt(f"{name}: chunk [{where}] is not one the index places here, or is written twice")
                    pending[(leaf, shard)].discard(region)
                    flat = np.concatenate([np.frombuffer(b, target.dtype) for _, _, b in subchunks])
                    target[tuple(slice(a, b) for a, b in region)] = flat.reshape([b - a for a, b in region])
        except (_Corrupt, ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise UserError(f"corrupt or truncated vmoe checkpoint shard {file}: {e}") from None
        del content
    short = sorted({leaves[leaf][0] for (leaf, _), regions in pending.items() if regions})
    if short:
        raise UserError(f"vmoe checkpoint {prefix} is incomplete: no data for {', '.join(short[:3])}")
    params = {name: _widen(array, info.dtype) for (name, info), array in zip(leaves, arrays)}
    facts = {
        "prefix": str(prefix),
        "version": version,
        "shards": count,
        "dtypes": sorted({info.dtype for _, info in leaves}),
        "parameters": int(sum(a.size for a in params.values())),
    }
    return params, facts


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The parameter tree's names and shapes, from the index alone."""
    _, leaves, _ = read_index(resolve_prefix(path))
    return {name: info.shape for name, info in leaves}


def _pack(value) -> bytes:
    import msgpack

    return msgpack.packb(value, use_bin_type=True)


def _slice_nd_bytes(region: tuple[tuple[int, int], ...]) -> bytes:
    return _pack(tuple(_pack((start, stop, 1)) for start, stop in region))


def write_checkpoint(prefix: str | Path, params: dict[str, np.ndarray], *, shards: int = 1) -> list[Path]:
    """Writes ``{"a/b/c": float32 array}`` as a vmoe partitioned checkpoint (index version 20220622),
    each array split along its first axis over the shards in turn, in the layout vmoe's own
    ``restore_checkpoint`` reads (checked by tests/fixtures/vmoe/make_fixtures.py). For synthetic
    checkpoints of real trees; vmoe's writer made the fixtures."""
    import msgpack

    prefix = Path(prefix)
    order = [name for name, _ in _flatten(_unflatten({n: n for n in params}))]  # leaf ids: jax.tree_util order
    contents: list[dict] = [{ARRAY_CHUNKS_KEY: True} for _ in range(shards)]
    infos: dict[str, msgpack.ExtType] = {}
    for leaf, name in enumerate(order):
        array = np.ascontiguousarray(params[name])
        rows = array.shape[0] if array.ndim else 1
        cuts = np.linspace(0, rows, min(shards, rows) + 1).astype(int)
        regions, owners = [], []
        for piece, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            region = ((int(lo), int(hi)), *((0, d) for d in array.shape[1:])) if array.ndim else ()
            chunk = array[lo:hi] if array.ndim else array
            data = msgpack.ExtType(EXT_NDARRAY, _pack(((chunk.size,), array.dtype.name, chunk.tobytes("C"))))
            shard = (leaf + piece) % shards
            contents[shard].setdefault(str(leaf), []).append(
                [[data], msgpack.ExtType(EXT_SLICE_ND, _slice_nd_bytes(region))]
            )
            regions.append(_slice_nd_bytes(region))
            owners.append(shard)
        shaped = _pack((list(array.shape), array.dtype.name, False, {}))
        infos[name] = msgpack.ExtType(EXT_INDEX_INFO, _pack((shaped, tuple(regions), tuple(owners))))
    tree = _unflatten(infos)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for shard, content in enumerate(contents):
        file = shard_path(prefix, shard, shards)
        file.write_bytes(msgpack.packb(content, use_bin_type=True))
        files.append(file)
    index = Path(f"{prefix}.index")
    index.write_bytes(msgpack.packb({"shard_count": shards, "index": tree, "version": "20220622"}, use_bin_type=True))
    return [index, *files]


def _unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree
