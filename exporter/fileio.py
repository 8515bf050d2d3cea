"""Outputs: checked before the work starts, written next to the destination, then renamed.

An interrupted run leaves the old file (or nothing), never a truncated one, and the next run into the
same destination removes the temporaries a killed run left behind (their names carry the writer's
process id). Before any long step, ``check_output`` refuses what must not be replaced (a directory, a
device or other special file) and a folder that cannot be written; ``check_space`` refuses a disk
without room for the expected output.

Symbolic links are followed: ``-o link`` writes the file the link points to and keeps the link (as
``cp`` and a shell's ``>`` do); the temporary goes beside the target, so the rename stays atomic.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import UserError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")  # .NAME.PID.RANDOM.tmp
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")  # .NAME.old-PID (publish_dir)


def resolve_output(dest: str | os.PathLike) -> Path:
    """Where writing ``dest`` writes: the path itself, or the target of a symbolic link."""
    dest = Path(dest)
    return Path(os.path.realpath(dest)) if dest.is_symlink() else dest


def check_output(dest: str | os.PathLike, *, folder: bool = False) -> Path:
    """Checks that ``dest`` (a file, or with ``folder`` a folder) can be written, before any long
    step; returns the path the writes go to (see ``resolve_output``). Raises UserError with one line."""
    path = resolve_output(dest)
    what = "folder" if folder else "file"
    if path.exists():
        mode = path.stat().st_mode
        if folder and not stat.S_ISDIR(mode):
            raise UserError(f"{dest} exists and is not a folder")
        if not folder and stat.S_ISDIR(mode):
            raise UserError(f"{dest} is a folder; give a file name")
        if not folder and not stat.S_ISREG(mode):
            raise UserError(f"{dest} is a special file (a device, pipe or socket); refusing to replace it")
    parent = _existing_folder(path)
    if not parent.is_dir():
        raise UserError(f"cannot write the {what} {dest}: {parent} is not a folder")
    try:  # a real write tells read-only mounts, permissions and ACLs apart better than os.access
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write the {what} {dest}: {os.strerror(e.errno).lower()} in {parent}") from None
    return path


def check_space(dest: str | os.PathLike, needed: int, what: str) -> None:
    """Refuses to start when the disk ``dest`` goes on has less than ``needed`` bytes free."""
    parent = _existing_folder(resolve_output(dest))
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise UserError(f"{what} needs about {_size(needed)} on {parent}, which has {_size(free)} free")


def _existing_folder(path: Path) -> Path:
    """The nearest existing ancestor of ``path``: where its missing folders will be made (``-o ..``
    is made in the parent of the working folder's parent, not in the working folder)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def remove_stale_temporaries(dest: str | os.PathLike) -> list[Path]:
    """Removes the temporaries of earlier runs into ``dest`` whose process is gone (a killed run);
    those of a run still going are left alone. Returns what was removed."""
    dest = Path(dest)
    removed = []
    try:
        entries = list(dest.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name) or _OLD.match(entry.name)
        if not match or match["name"] != dest.name or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:  # EPERM: someone else's process, alive
        return e.errno == errno.EPERM
    return True


@contextmanager
def temp_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``dest`` (named after it and this process), removed afterwards;
    stale ones of killed runs into ``dest`` are removed first."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in ``dest``'s folder; renames it onto ``dest`` if the block succeeds."""
    dest = check_output(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
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
    dest = check_output(dest)
    with temp_dir(dest) as tmp:
        yield tmp
        files = sorted(tmp.iterdir(), key=lambda f: f.name == dest.name)
        targets = [check_output(dest.parent / f.name) for f in files]
        for f, target in zip(files, targets, strict=True):
            os.replace(f, target)


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


def check_replaceable(dest: str | os.PathLike, listed: set[str] | None, what: str) -> None:
    """Refuses, with one line, to replace a folder that moe-export must not: the working folder or one
    holding it; a non-empty folder moe-export did not write (``listed`` is None: no marker and manifest
    of its own there); or one of its folders that now holds files it did not write (anything not in
    ``listed``, the relative paths its manifest names), which would be lost."""
    dest = Path(dest)
    here, target = Path.cwd().resolve(), dest.resolve()
    if target == here or target in here.parents:
        raise UserError(f"{dest} is the working folder or holds it; moe-export never replaces it: give -o a new folder")
    if not dest.is_dir():
        return
    found = []
    for root, dirs, names in os.walk(dest):
        dirs[:] = [d for d in dirs if d != "__pycache__" or os.path.islink(os.path.join(root, d))]
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [Path(root, n).relative_to(dest).as_posix() for n in sorted(names + links)]
    if not found:
        return
    if listed is None:
        raise UserError(f"{dest} exists and is not a moe-export {what}; choose another -o")
    extra = [f for f in found if f not in listed]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UserError(
            f"{dest} is a moe-export {what} that now also holds files moe-export did not write "
            f"({', '.join(extra[:3])}{more}); move them out or choose another -o"
        )


def publish_dir(tmp: Path, dest: Path) -> None:
    """Moves a finished folder assembled beside ``dest`` onto it, with the umask's permissions (mkdtemp
    makes 0700); an old folder there is set aside first, then removed. A link to a folder is followed."""
    dest = check_output(dest, folder=True)
    os.chmod(tmp, 0o777 & ~current_umask())
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
