"""The README's sample outputs and the numbers it takes from the tool, checked against what the tool
prints now, so that they cannot drift: a block marked ``<!-- sample: NAME -->`` (the line before its
fence) is what a command prints, compared line by line with a run of that command (numbers masked
where the README shows a bigger model, timings and another machine's errors), and the vmoe-tiny
bundle size is the one ``build bundle`` reports."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import run

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLE = re.compile(r"^<!-- sample: ([\w-]+) -->\n```[a-z]*\n(.*?)^```", re.M | re.S)
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def samples() -> dict[str, str]:
    return dict(SAMPLE.findall(README.read_text()))


def masked(text: str, **renamed: str) -> list[str]:
    """The lines of ``text`` with names replaced (``renamed``), every number as ``#`` and runs of
    spaces (table alignment, which follows the numbers' widths) as one."""
    for old, new in renamed.items():
        text = text.replace(old, new)
    return [" ".join(NUMBER.sub("#", line).split()) for line in text.strip().splitlines()]


def run_in(folder: Path, monkeypatch, *args):
    monkeypatch.chdir(folder)
    return run(*args)


def test_the_samples_are_there():
    assert set(samples()) == {"validate", "build-engine-without-tensorrt"}


def test_the_validate_sample_is_what_validate_prints(exported, tmp_path, monkeypatch):
    """The README runs vmoe-s32-last2-e8 (two V-MoE layers, 57M parameters); vmoe-tiny has two V-MoE
    layers too and prints the same lines, tables and notes, but for the numbers."""
    _, result = exported("vmoe-tiny")
    shutil.copy(result.path, tmp_path / "vmoe.onnx")
    out = run_in(tmp_path, monkeypatch, "validate", "vmoe.onnx")
    assert out.exit_code == 0, out.output
    printed = masked(out.stdout, **{"vmoe-tiny": "vmoe-s32-last2-e8"})  # layer numbers are masked too
    assert printed == masked(samples()["validate"]), "README's validate sample is out of date:\n" + out.stdout


def test_the_refusal_without_tensorrt_is_the_line_build_engine_prints(bundled, tmp_path, monkeypatch):
    from exporter.backends.tensorrt import tensorrt_available

    if tensorrt_available() is None:
        pytest.skip("TensorRT and a GPU are here: build engine builds instead of refusing")
    _, _, folder = bundled("soft-moe-tiny")
    shutil.copytree(folder, tmp_path / "vmoe-bundle")
    out = run_in(tmp_path, monkeypatch, "build", "engine", "vmoe-bundle")
    assert out.exit_code == 2 and out.stderr.strip() == samples()["build-engine-without-tensorrt"].strip()


def test_the_vmoe_tiny_bundle_size_is_what_build_bundle_prints(bundled):
    """`moe-export build bundle --model vmoe-tiny -o DIR` prints "N files, X MiB": the README's X."""
    (size,) = re.findall(r"^\| `vmoe-tiny` \| [^|]* \| ([\d.]+ MiB) \|", README.read_text(), re.M)
    _, result, _ = bundled("vmoe-tiny")
    assert size == f"{sum(f['bytes'] for f in result.files.values()) / 2**20:,.1f} MiB"
