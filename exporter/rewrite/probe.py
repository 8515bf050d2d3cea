"""The probe: one ONNX Runtime run of the portable graph with the candidate tensors exposed."""

from __future__ import annotations

import contextlib
import os
import tempfile
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
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(names))
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    with contextlib.ExitStack() as stack:
        if external:  # relative weight paths resolve from the model's folder
            fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=path.parent)
            os.close(fd)
            stack.callback(os.unlink, tmp)
            onnx.save(exposed, tmp)
            session = ort_backend.session(tmp)
        else:
            session = ort_backend.session(exposed.SerializeToString())
        return ort_backend.run(session, {input_name: images})
