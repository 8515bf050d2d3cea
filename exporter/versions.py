"""Installed package versions, read from package metadata (nothing is imported)."""

from __future__ import annotations

import importlib.metadata
import platform

#: What a bundle manifest and a benchmark report record.
PACKAGES = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "triton", "numpy")


def package_version(*names: str) -> str | None:
    """The version of the first of ``names`` that is installed (a package and its alternatives,
    e.g. ``"tensorrt", "tensorrt-cu12"``), or None."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions(packages=PACKAGES) -> dict[str, str | None]:
    """moe-export's, Python's and each package's version."""
    return {"moe-export": package_version("moe-export"), "python": platform.python_version()} | {
        p: package_version(p) for p in packages
    }
