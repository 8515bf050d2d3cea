"""The model-local ONNX function of each plugin, by name (see ``plugins/<op>/function.py``)."""

from __future__ import annotations

import importlib

import onnx

_MODULES = {
    "TopKRoute": "topk_route",
    "TopKDispatch": "topk_dispatch",
    "TopKCombine": "topk_combine",
    "SoftRoute": "soft_route",
    "SoftDispatch": "soft_dispatch",
    "SoftCombine": "soft_combine",
}


def local_function(name: str) -> onnx.FunctionProto:
    """The FunctionProto (domain ``moe``) holding ``name``'s standard-op decomposition."""
    return importlib.import_module(f"plugins.{_MODULES[name]}.function").function()
