"""Atomic outputs: write next to the destination, then rename. An interrupted run leaves the old file
(or nothing), never a truncated one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in ``dest``'s folder; renames it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``dest``. Files written there named after ``dest`` are moved
    next to it on success, ``dest`` itself last, so it appears only once its companions (e.g. ONNX
    external data) are complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == dest.name):
            os.replace(f, dest.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(dest: str | os.PathLike, data) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256(*paths: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of one file, or of several read one after the other (a checkpoint's index and shards)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def publish_dir(tmp: Path, dest: Path) -> None:
    """Moves a finished folder assembled beside ``dest`` onto it, with the umask's permissions (mkdtemp
    makes 0700); an old folder there is set aside first, then removed."""
    os.chmod(tmp, 0o777 & ~current_umask())
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
