"""The probe: ONNX Runtime runs of the portable graph with the candidate tensors exposed, on random images,
at the batches the rules ask for (one run per batch, cached)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from exporter import settings
from exporter.backends import onnxruntime as ort_backend
from exporter.errors import UserError
from exporter.formats.graph import batch_multiple, image_input, input_dims


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


class Probe:
    """``at(batch)``: the values of ``names`` for ``batch`` random images. ``batches`` lists the batches
    the graph takes, the default first, then one more group, then others (a fixed-batch graph: one)."""

    def __init__(self, path: Path, proto: onnx.ModelProto, names: set[str], seed: int):
        self.path, self.proto, self.names, self.seed = path, proto, sorted(names), seed
        self.input_name, shape = probe_batch(proto)
        self.image_shape = shape[1:]
        self.multiple = batch_multiple(proto)
        first, m = shape[0], self.multiple
        if isinstance(input_dims(image_input(proto))[0], int):
            self.batches = [first]
        else:
            self.batches = list(dict.fromkeys([first, first + m if first == m else m, first + m, first + 2 * m]))
        self._values: dict[int, dict[str, np.ndarray]] = {}

    def at(self, batch: int) -> dict[str, np.ndarray]:
        if batch not in self._values:
            if batch % self.multiple or (len(self.batches) == 1 and batch != self.batches[0]):
                raise UserError(f"the graph does not take a batch of {batch} images")
            rng = np.random.default_rng(self.seed + batch)
            images = rng.standard_normal((batch, *self.image_shape)).astype(np.float32)
            self._values[batch] = ort_backend.run_exposing(self.path, self.proto, self.names, {self.input_name: images})
        return self._values[batch]


def probe(path: Path, proto: onnx.ModelProto, names: set[str], seed: int) -> dict[str, np.ndarray]:
    """Values of the tensors ``names`` for random images (the graph's own batch rule)."""
    input_name, shape = probe_batch(proto)
    images = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return ort_backend.run_exposing(path, proto, sorted(names), {input_name: images})
