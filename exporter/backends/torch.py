"""PyTorch: a model's flat outputs and per-layer routing on numpy images (CPU)."""

from __future__ import annotations

import numpy as np
import torch

from exporter.models.capture import run_with_routing
from exporter.models.routing import TopKRouting


def run_torch(module: torch.nn.Module, images: np.ndarray) -> tuple[list[np.ndarray], dict[str, TopKRouting]]:
    """Flat outputs and per-layer routing of one CPU forward pass."""
    outputs, routing = run_with_routing(module, torch.from_numpy(images))
    return [o.numpy() for o in outputs], routing
