"""Shared fixtures. Tests mirror the source tree; everything here runs on CPU.

A test that needs CUDA or TensorRT carries the ``gpu`` marker and is skipped with one reason when
either is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.helpers")

ROOT = Path(__file__).resolve().parents[1]
GPU_SKIP_REASON = "needs an NVIDIA GPU with CUDA and TensorRT (not present on this machine)"


def _has_gpu_and_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


SLOW_SKIP_REASON = "slow (minutes): run with -m slow"
RTX_GPU_SKIP_REASON = "needs an NVIDIA GPU that TensorRT for RTX builds for (sm_75 to sm_121, not Hopper)"


def _has_rtx_gpu() -> bool:
    from exporter.backends.tensorrt_rtx import TARGETS, gpu_arch, rtx_available

    return rtx_available() is None and gpu_arch() in TARGETS


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _has_gpu_and_tensorrt():
        skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if any("rtx_gpu" in item.keywords for item in items) and not _has_rtx_gpu():
        for item in items:
            if "rtx_gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=RTX_GPU_SKIP_REASON))
    if "slow" not in (config.getoption("markexpr") or ""):
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=SLOW_SKIP_REASON))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Exports a zoo model once per session per configuration: ``exported(name, **overrides)``."""
    from exporter.export.export import export_onnx
    from exporter.sources.loading import from_zoo, load

    cache: dict = {}
    folder = tmp_path_factory.mktemp("exported")

    def export(
        name: str, routing_outputs: bool = True, precision: str = "fp32", routing_precision: str = "fp32", **overrides
    ):
        key = (name, routing_outputs, precision, routing_precision, tuple(sorted(overrides.items())))
        if key not in cache:
            source = from_zoo(name, **overrides)
            path = folder / f"model{len(cache)}.onnx"
            result = export_onnx(
                load(source),
                path,
                routing_outputs=routing_outputs,
                precision=precision,
                routing_precision=routing_precision,
            )
            cache[key] = (source, result)
        return cache[key]

    return export


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    """Builds a deploy bundle once per session per configuration: ``bundled(name, **overrides)`` ->
    (source, BundleResult, folder). Tests that change a bundle copy it first."""
    from exporter.deploy.bundle import build_bundle
    from exporter.sources.loading import from_zoo

    cache: dict = {}
    folder = tmp_path_factory.mktemp("bundles")

    def build(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            source = from_zoo(name, **overrides)
            cache[key] = (source, build_bundle(source, folder / f"bundle{len(cache)}"), folder / f"bundle{len(cache)}")
        return cache[key]

    return build
