"""PyTorch reference models: the ViT backbone and the two MoE layers, usable in your own models."""

from exporter.models.capture import capture_routing
from exporter.models.soft_moe import SoftMoEMlp
from exporter.models.vit import VisionTransformer
from exporter.models.vmoe import VMoEMlp

__all__ = ["SoftMoEMlp", "VMoEMlp", "VisionTransformer", "capture_routing"]
