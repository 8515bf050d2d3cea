"""Backends that run a model on named numpy inputs and return named numpy outputs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import torch

from exporter.errors import UserError
from exporter.export import run_with_routing
from exporter.routing import TopKRouting


def read_onnx_header(path: str | Path) -> onnx.ModelProto:
    """The graph without its weights; one clear error for a missing, unreadable or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).strip()[:120]})") from None
    if not model.graph.node:
        raise UserError(f"{path} is not a readable ONNX model (it has no graph)")
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def run_torch(module: torch.nn.Module, images: np.ndarray) -> tuple[list[np.ndarray], dict[str, TopKRouting]]:
    """Flat outputs and per-layer routing of one CPU forward pass."""
    outputs, routing = run_with_routing(module, torch.from_numpy(images))
    return [o.numpy() for o in outputs], routing


def run_onnxruntime(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).strip().splitlines()[0][:200]}") from None
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feeds)
    except Exception as e:
        raise UserError(f"ONNX Runtime failed to run {path}: {str(e).strip().splitlines()[0][:200]}") from None
    return dict(zip(names, values))


@contextlib.contextmanager
def quiet_polygraphy(severity: str = "ERROR"):
    """Polygraphy logs to stdout, which belongs to our tables and ``--json -``: only ``severity`` and
    worse get through, without colours (and so without its hint to install a colour module)."""
    from polygraphy.logger import G_LOGGER

    colors = G_LOGGER.colors
    G_LOGGER.colors = False
    try:
        with G_LOGGER.verbosity(getattr(G_LOGGER, severity)):
            yield
    finally:
        G_LOGGER.colors = colors
