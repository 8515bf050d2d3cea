"""moe-export library: Vision MoE models (V-MoE, Soft-MoE) from PyTorch to portable ONNX, with
routing-aware parity.

Public names are imported on first use, so ``import exporter`` stays light (no torch, no onnx)
and the CLI's ``--help`` is instant.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    # reference semantics
    "vmoe_combine_weights": "exporter.routing",
    "soft_moe_weights": "exporter.routing",
    "compute_capacity": "exporter.routing",
    "route_top_k": "exporter.routing",
    "TopKRouting": "exporter.routing",
    # models and zoo
    "ModelConfig": "exporter.zoo",
    "ZOO": "exporter.zoo",
    "get_config": "exporter.zoo",
    "build_model": "exporter.zoo",
    "param_count": "exporter.zoo",
    "VMoEMlp": "exporter.models.vmoe",
    "SoftMoEMlp": "exporter.models.soft_moe",
    "capture_routing": "exporter.models.capture",
    # reference checkpoints (google-research/vmoe)
    "load_vmoe_checkpoint": "exporter.checkpoints",
    "import_vmoe": "exporter.checkpoints",
    # pipeline
    "ModelSource": "exporter.source",
    "from_zoo": "exporter.source",
    "from_module": "exporter.source",
    "load": "exporter.source",
    "export_onnx": "exporter.export",
    "check_portable": "exporter.portable",
    "validate_onnx": "exporter.parity",
    "ParityReport": "exporter.parity",
    # errors
    "UserError": "exporter.errors",
    "CheckFailed": "exporter.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'exporter' has no attribute {name!r}")


def __dir__():
    return __all__
