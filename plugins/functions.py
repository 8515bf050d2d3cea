"""The model-local ONNX function of each plugin, by name (see ``plugins/<op>/function.py``)."""

from __future__ import annotations

import importlib

import onnx

from plugins import FOLDERS


def local_function(name: str) -> onnx.FunctionProto:
    """The FunctionProto (domain ``moe``) holding ``name``'s standard-op decomposition."""
    return importlib.import_module(f"plugins.{FOLDERS[name]}.function").function()
