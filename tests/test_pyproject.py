"""Dependency floors that code relies on, and pins loose enough for the GPU test machine."""

from __future__ import annotations

import re
from pathlib import Path

TEXT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # tomllib needs Python 3.11


def section(name: str) -> str:
    """The requirement strings of one array of pyproject.toml (``dependencies = [...]`` or an extra)."""
    match = re.search(rf"^{re.escape(name)} = \[(.*?)\]", TEXT, re.M | re.S)
    assert match, name
    return match.group(1)


def floor(requirements: str, package: str) -> tuple[int, ...]:
    (spec,) = re.findall(rf'"{re.escape(package)}\s*>=\s*([\d.]+)', requirements)
    return tuple(int(p) for p in spec.split("."))


def test_polygraphy_floor_has_the_progress_monitor():
    # exporter.backends.tensorrt passes CreateConfig(progress_monitor=...): Polygraphy 0.49.0 lacks it, 0.49.9 has it
    assert floor(section("dependencies"), "polygraphy") >= (0, 49, 9)


def test_triton_pins_admit_the_gpu_machines_3_6():
    for extra in ("plugins", "test"):
        assert floor(section(extra), "triton") <= (3, 6)


def test_msgpack_reads_the_reference_checkpoints():
    assert floor(section("dependencies"), "msgpack") >= (1, 0)
