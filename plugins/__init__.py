"""TensorRT plugins for MoE routing, dispatch and combine (one folder per plugin).

Each ``plugins/<op>/`` holds ``spec.py`` (the node contract), ``reference.py`` (the semantics in
PyTorch), ``kernels.py`` (Triton kernels, their launcher and AOT recipe) and ``trt.py`` (the
Quickly Deployable Plugin registration). ``import plugins`` loads only the specs: no torch, triton
or tensorrt. ``plugins.register.register_all()`` registers every plugin with TensorRT.
"""

from __future__ import annotations

from plugins.soft_combine.spec import SPEC as _SOFT_COMBINE
from plugins.soft_dispatch.spec import SPEC as _SOFT_DISPATCH
from plugins.soft_route.spec import SPEC as _SOFT_ROUTE
from plugins.spec import NAMESPACE, AttrSpec, PluginSpec, TensorSpec
from plugins.topk_combine.spec import SPEC as _TOPK_COMBINE
from plugins.topk_dispatch.spec import SPEC as _TOPK_DISPATCH
from plugins.topk_route.spec import SPEC as _TOPK_ROUTE

__all__ = ["FOLDERS", "NAMESPACE", "SPECS", "AttrSpec", "PluginSpec", "TensorSpec", "plugin_id"]

#: Plugin name -> folder under ``plugins/``.
FOLDERS: dict[str, str] = {
    _TOPK_ROUTE.name: "topk_route",
    _TOPK_DISPATCH.name: "topk_dispatch",
    _TOPK_COMBINE.name: "topk_combine",
    _SOFT_ROUTE.name: "soft_route",
    _SOFT_DISPATCH.name: "soft_dispatch",
    _SOFT_COMBINE.name: "soft_combine",
}

SPECS: dict[str, PluginSpec] = {
    s.name: s for s in (_TOPK_ROUTE, _TOPK_DISPATCH, _TOPK_COMBINE, _SOFT_ROUTE, _SOFT_DISPATCH, _SOFT_COMBINE)
}


def plugin_id(name: str) -> str:
    """``"moe::Name"``, the id TensorRT registers the plugin under."""
    if name not in SPECS:
        raise KeyError(f"unknown plugin {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name].id
