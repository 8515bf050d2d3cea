"""Fixtures written by vmoe's own checkpoint writer and forward pass (tests/fixtures/vmoe/make_fixtures.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "vmoe"
VMOE = FIXTURES / "vmoe_small"
VMOE_BF16 = FIXTURES / "vmoe_small_bf16"
SOFT = FIXTURES / "soft_small"
GROUP_IMAGES = 2  # the fixtures' V-MoE routes groups of 2 images (group_size = 2 x 17 tokens)


@pytest.fixture(scope="session")
def reference():
    return dict(np.load(FIXTURES / "reference.npz"))


@pytest.fixture
def copy_checkpoint(tmp_path):
    """``copy_checkpoint(prefix)``: the checkpoint's files copied into tmp_path; returns the new prefix."""

    def copy(prefix: Path, index: Path | None = None) -> Path:
        new = tmp_path / prefix.name
        for f in FIXTURES.glob(f"{prefix.name}.data-*"):
            shutil.copy(f, tmp_path / f.name)
        shutil.copy(index or Path(f"{prefix}.index"), Path(f"{new}.index"))
        return new

    return copy
