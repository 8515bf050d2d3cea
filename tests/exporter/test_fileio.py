"""Atomic outputs: complete or absent, never truncated, with the usual file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from exporter.fileio import atomic_dir, atomic_path, write_json


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert dest.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_outputs_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        with atomic_dir(tmp_path / "g.onnx") as tmp:
            (tmp / "g.onnx").write_bytes(b"x")
    finally:
        os.umask(mask)
    for name in ("r.json", "g.onnx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
