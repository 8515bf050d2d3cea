"""Arrays from ``.npz`` files someone handed over (``--inputs``, a bundle's samples and reference
outputs): every member's size is checked from the zip's central directory and its ``.npy`` header
before anything is inflated or allocated, objects (pickles) are refused, and NaN or infinity in an
input is refused naming the array. numpy only.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from exporter import settings
from exporter.errors import UserError

_HEADER_BYTES = 1 << 16  # an .npy header is at most this long; the rest of a member is its data
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npz(
    path: str | Path, *, max_bytes: int = settings.MAX_INPUT_BYTES, what: str = "arrays"
) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (``np.savez``), each at most ``max_bytes``; a user error naming the
    file (and the member) for anything else: not a zip, too many members, a member declaring more
    than the limit (checked before it is inflated), an ``.npy`` header whose shape does not fit the
    member, pickled objects."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > settings.MAX_NPZ_MEMBERS:
                raise UserError(f"{path} holds {len(members):,} arrays; the limit is {settings.MAX_NPZ_MEMBERS}")
            for info in members:
                name = info.filename.removesuffix(".npy")
                if info.file_size > max_bytes + _HEADER_BYTES:
                    raise UserError(
                        f"{path}: {name!r} declares {info.file_size:,} bytes; the limit is {max_bytes:,} "
                        "(refused before inflating it)"
                    )
                with archive.open(info) as member:
                    shape, dtype = _header(member, path, name)
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > min(max_bytes, info.file_size):
                    raise UserError(
                        f"{path}: {name!r} says it is {dtype}{list(shape)}, {nbytes:,} bytes, which does not fit "
                        f"the {info.file_size:,} bytes it holds (or the limit of {max_bytes:,})"
                    )
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # missing, not a zip, a damaged member
        raise UserError(f"cannot read {what} from {path}: {type(e).__name__}: {str(e).strip()[:160]}") from None


def _header(member, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    reader = _HEADER_READERS.get(version)
    if reader is None:
        raise UserError(f"{path}: {name!r} is an .npy of version {version}, which moe-export does not read")
    shape, _, dtype = reader(member)
    if dtype.hasobject:
        raise UserError(f"{path}: {name!r} holds Python objects (a pickle), which moe-export never loads")
    return shape, dtype


def check_finite(array: np.ndarray, name: str, where: str | Path) -> None:
    """Refuses NaN and infinity in a floating input, naming the array and how many there are."""
    if np.issubdtype(array.dtype, np.floating) and not (finite := np.isfinite(array)).all():
        bad = int(array.size - np.count_nonzero(finite))
        raise UserError(f"{where}: {name!r} holds {bad:,} NaN or infinite values; inputs must be finite numbers")
