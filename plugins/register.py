"""Register every ``moe::`` plugin with TensorRT: ``register_all()`` before parsing or deserializing."""

from __future__ import annotations

import importlib.util

from plugins import registry

_registered: set[str] = set()  # TensorRT's registry is per process: register each plugin once


def register_all() -> list[str]:
    """Imports each ``plugins/<op>/trt.py`` and registers its plugin; returns the plugin ids.

    Needs TensorRT >= 10.9 (``tensorrt.plugin`` with ``aot_impl``); raises RuntimeError when absent.
    """
    try:
        installed = importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        raise RuntimeError(
            "TensorRT is not installed: the moe plugins register with TensorRT's Python package "
            "(tensorrt >= 10.9, on a machine with an NVIDIA GPU)"
        )
    import tensorrt as trt

    if not hasattr(trt, "QuickPluginCreationRequest"):
        raise RuntimeError(f"TensorRT {trt.__version__} lacks AOT Python plugins; need >= 10.9")
    for name, spec in registry.specs().items():
        if spec.id not in _registered:
            registry.module(name, "trt").register()
            _registered.add(spec.id)
    return [spec.id for spec in registry.specs().values()]
