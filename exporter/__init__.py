"""moe-export library: Vision MoE models (V-MoE, Soft-MoE) from PyTorch to portable ONNX, with
routing-aware parity.

Public names are imported on first use, so ``import exporter`` stays light (no torch, no onnx)
and the CLI's ``--help`` is instant.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    # reference semantics
    "vmoe_combine_weights": "exporter.models.routing",
    "soft_moe_weights": "exporter.models.routing",
    "compute_capacity": "exporter.models.routing",
    "route_top_k": "exporter.models.routing",
    "TopKRouting": "exporter.models.routing",
    # models and zoo
    "ModelConfig": "exporter.sources.zoo",
    "ZOO": "exporter.sources.zoo",
    "get_config": "exporter.sources.zoo",
    "build_model": "exporter.sources.zoo",
    "param_count": "exporter.sources.zoo",
    "VMoEMlp": "exporter.models.vmoe",
    "SoftMoEMlp": "exporter.models.soft_moe",
    "capture_routing": "exporter.models.capture",
    # reference checkpoints (google-research/vmoe)
    "load_vmoe_checkpoint": "exporter.sources.checkpoints",
    "import_vmoe": "exporter.sources.checkpoints",
    # Swin-MoE (microsoft/Swin-Transformer with microsoft/tutel)
    "load_swin_moe_checkpoint": "exporter.sources.checkpoints.swin_moe",
    "import_swin_moe": "exporter.sources.checkpoints.swin_moe",
    "route_tutel": "exporter.models.tutel_routing",
    "SwinMoEConfig": "exporter.sources.swin_moe",
    # the pipeline, one call per stage (what each CLI command runs)
    "ModelSource": "exporter.sources.loading",
    "LoadedModel": "exporter.sources.loading",
    "from_zoo": "exporter.sources.loading",
    "from_module": "exporter.sources.loading",
    "from_vmoe_checkpoint": "exporter.sources.loading",
    "load": "exporter.sources.loading",
    "recorded_source": "exporter.parity.parity",
    "export_model": "exporter.export.export",
    "export_onnx": "exporter.export.export",
    "ExportResult": "exporter.export.export",
    "check_portable": "exporter.export.portable",
    "rewrite_onnx": "exporter.rewrite.rewrite",
    "RewriteResult": "exporter.rewrite.plan",
    "validate": "exporter.parity.validate",
    "validate_onnx": "exporter.parity.validate",
    "validate_engine": "exporter.parity.validate",
    "ParityReport": "exporter.parity.parity",
    "Tolerances": "exporter.settings",
    "build_bundle": "exporter.deploy.bundle",
    "BundleResult": "exporter.deploy.bundle",
    "build_engine_for": "exporter.deploy.engines",
    "check_engine_request": "exporter.deploy.engines",
    "EngineOptions": "exporter.backends.tensorrt",
    "EngineRun": "exporter.deploy.engines",
    "RTXEngines": "exporter.deploy.engines",
    # tools
    "bench": "exporter.tools.bench",
    "BenchReport": "exporter.tools.bench",
    "sweep_capacity": "exporter.tools.sweep",
    "SweepReport": "exporter.tools.sweep",
    "inspect_routing": "exporter.tools.inspect_routing",
    "RoutingPicture": "exporter.tools.inspect_routing",
    "demo": "exporter.tools.demo",
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
