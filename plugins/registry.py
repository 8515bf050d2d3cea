"""The plugins ``plugins.PLUGINS`` lists, by name: their specs and their modules.

Everything that needs to know which plugins exist asks here, so a new plugin is one folder plus
one line in ``plugins.PLUGINS``.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import plugins
from plugins.spec import PluginSpec


def package(entry: str) -> str:
    """The module path of a registry entry: a folder under ``plugins/`` or a full module path."""
    return entry if "." in entry else f"plugins.{entry}"


@functools.cache
def _load(entries: tuple[str, ...]) -> dict[str, tuple[PluginSpec, str]]:
    found: dict[str, tuple[PluginSpec, str]] = {}
    for entry in entries:
        spec = importlib.import_module(f"{package(entry)}.spec").SPEC
        if spec.name in found:
            raise ValueError(f"plugin {spec.name} is registered twice ({found[spec.name][1]} and {package(entry)})")
        found[spec.name] = (spec, package(entry))
    return found


def specs() -> dict[str, PluginSpec]:
    """``{name: spec}`` of every registered plugin, in registry order."""
    return {name: spec for name, (spec, _) in _load(tuple(plugins.PLUGINS)).items()}


def spec(name: str) -> PluginSpec:
    """The spec of one plugin; KeyError naming the known ones."""
    known = _load(tuple(plugins.PLUGINS))
    if name not in known:
        raise KeyError(f"unknown plugin {name!r}; known: {', '.join(known)}")
    return known[name][0]


def module(name: str, part: str) -> ModuleType:
    """One module of a plugin's folder: ``"function"``, ``"kernels"``, ``"reference"`` or ``"trt"``."""
    spec(name)
    return importlib.import_module(f"{_load(tuple(plugins.PLUGINS))[name][1]}.{part}")


def plugin_id(name: str) -> str:
    """``"moe::Name"``, the id TensorRT registers the plugin under."""
    return spec(name).id


def is_plugin_node(node) -> bool:
    """Whether an ONNX node (NodeProto or graphsurgeon Node) is a registered plugin's node."""
    domain = getattr(node, "domain", "")
    op = node.op_type if hasattr(node, "op_type") else node.op
    known = specs()
    return op in known and known[op].namespace == domain


def namespaces() -> set[str]:
    """The plugin namespaces (ONNX domains) in use: ``{"moe"}``."""
    return {s.namespace for s in specs().values()}


def local_function(name: str, opset: int | None = None):
    """The model-local ONNX FunctionProto holding ``name``'s standard-op decomposition, importing the
    standard domain at ``opset`` (the graph's own; never below the opset the bodies are written in,
    ``plugins.onnx_function.OPSET``)."""
    from plugins.onnx_function import OPSET

    function = module(name, "function").function()
    if opset is not None:
        for entry in function.opset_import:
            if entry.domain == "":
                entry.version = max(opset, OPSET)
    return function


def kernel(kernel_name: str):
    """The Triton kernel a recipe names: the first plugin whose ``kernels.kernel(name)`` knows it."""
    for name in specs():
        kernels = module(name, "kernels")
        try:
            return kernels.kernel(kernel_name)
        except KeyError:
            continue
    raise KeyError(f"no plugin kernel named {kernel_name!r}")
