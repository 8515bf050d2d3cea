"""The probe: one ONNX Runtime run of the portable graph with the candidate tensors exposed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from exporter import settings
from exporter.backends import onnxruntime as ort_backend
from exporter.errors import UserError
from exporter.formats.graph import batch_multiple, image_input


def probe_batch(proto: onnx.ModelProto) -> tuple[str, list[int]]:
    """(input name, shape) of the probe images: the graph's own image shape, the default batch."""
    value = image_input(proto)
    shape = []
    for i, d in enumerate(value.type.tensor_type.shape.dim):
        if d.dim_value:
            shape.append(d.dim_value)
        elif i == 0:
            shape.append(settings.default_batch(batch_multiple(proto)))
        else:
            raise UserError(f"input {value.name} has a dynamic dimension {i} ({d.dim_param}); only the batch may be")
    return value.name, shape


def probe(path: Path, proto: onnx.ModelProto, names: set[str], seed: int) -> dict[str, np.ndarray]:
    """Values of the tensors ``names`` for random images (the graph's own batch rule)."""
    input_name, shape = probe_batch(proto)
    images = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return ort_backend.run_exposing(path, proto, sorted(names), {input_name: images})
