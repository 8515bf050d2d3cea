"""TensorRT plugins for MoE routing, dispatch and combine (one folder per plugin).

Each ``plugins/<op>/`` holds ``spec.py`` (the node contract), ``reference.py`` (the semantics in
PyTorch), ``function.py`` (the same in standard ONNX ops, the node's local function),
``kernels.py`` (Triton kernels, their launcher and AOT recipe) and ``trt.py`` (the Quickly
Deployable Plugin registration). ``PLUGINS`` below is the registry: everything that needs to know
the plugins (the rewrite, the engine's plugin check, AOT compilation, TensorRT registration) reads
it through ``plugins.registry``. Adding a plugin is one folder plus one line here.

``import plugins`` loads nothing heavy (no torch, triton or tensorrt), and nothing in this package
imports ``exporter``: the package is copied into deploy bundles and runs on the target alone.
"""

from __future__ import annotations

#: The registry: each plugin's folder under ``plugins/`` (or a full module path, for plugins kept
#: elsewhere), in the order reports list them.
PLUGINS: tuple[str, ...] = (
    "topk_route",
    "topk_dispatch",
    "topk_combine",
    "soft_route",
    "soft_dispatch",
    "soft_combine",
)
