"""Arrays from .npz files someone handed over: sizes checked from the headers before inflating."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.errors import UserError
from exporter.formats.arrays import check_finite, load_npz


def test_an_npz_reads_back(tmp_path):
    images = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.savez_compressed(tmp_path / "a.npz", images=images, other=np.zeros(3, np.int32))
    arrays = load_npz(tmp_path / "a.npz")
    assert sorted(arrays) == ["images", "other"] and np.array_equal(arrays["images"], images)


def test_a_member_over_the_limit_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "a.npz", images=np.zeros((1000, 1000), np.float32))  # 4 MB, a few KiB zipped
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("inflated before the check"))
    with pytest.raises(UserError, match="'images' declares 4,000,128 bytes; the limit is 1,000"):
        load_npz(tmp_path / "a.npz", max_bytes=1000)


def test_not_an_npz(tmp_path):
    (tmp_path / "a.npz").write_text("hello")
    with pytest.raises(UserError, match="cannot read arrays from .*a.npz: BadZipFile"):
        load_npz(tmp_path / "a.npz")


def test_non_finite_values_are_counted_and_named():
    check_finite(np.zeros(3, np.float32), "images", "x.npz")
    check_finite(np.array([1, 2], np.int64), "images", "x.npz")
    with pytest.raises(UserError, match="x.npz: 'images' holds 2 NaN or infinite values"):
        check_finite(np.array([np.nan, 1, -np.inf], np.float32), "images", "x.npz")
