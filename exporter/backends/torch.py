"""PyTorch: a model's flat outputs and per-layer routing on numpy images (CPU)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from exporter.backends.runner import Runner
from exporter.models.capture import run_with_routing
from exporter.models.experts import bfloat16_rounding
from exporter.models.routing import TopKRouting


def run_torch(module: torch.nn.Module, images: np.ndarray) -> tuple[list[np.ndarray], dict[str, TopKRouting]]:
    """Flat outputs and per-layer routing of one CPU forward pass."""
    outputs, routing = run_with_routing(module, torch.from_numpy(images))
    return [o.numpy() for o in outputs], routing


@contextlib.contextmanager
def router_outputs(module: torch.nn.Module):
    """``with router_outputs(model) as found: model(x)`` fills ``found`` with every MoE layer's router
    outputs, as the graph's ``exporter.formats.graph.router_tensors`` names them: V-MoE ``{"gates"}``
    (the FP32 softmax of the router logits, ``[G, S, E]``), Soft-MoE ``{"dispatch", "combine"}``."""
    from exporter.models.soft_moe import soft_moe_layers
    from exporter.models.vmoe import vmoe_layers

    found: dict[str, dict[str, np.ndarray]] = {}
    handles = []

    def keep_gates(name):
        return lambda _m, _in, out: found.__setitem__(name, {"gates": torch.softmax(out.float(), -1).numpy()})

    def keep_weights(name):
        return lambda _m, _in, out: found.__setitem__(name, {"dispatch": out[0].numpy(), "combine": out[1].numpy()})

    for name, layer in vmoe_layers(module):
        handles.append(layer.router.register_forward_hook(keep_gates(name)))
    for name, layer in soft_moe_layers(module):
        handles.append(layer.router.register_forward_hook(keep_weights(name)))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def rounding_as(values: list[np.ndarray], rtol: float):
    """``with rounding_as(graph_values, rtol) as found: model(x)``: the model's bfloat16 roundings, in
    call order, take a graph's rounded values (``values``, ``formats.graph.bfloat16_roundings``) at the
    elements where a value within ``rtol`` of the tensor's scale of PyTorch's own rounds to the
    graph's: a midpoint between two bfloat16 neighbours lies that close, and float32 noise decided.
    ``found`` gets one ``(elements, at_midpoint, unexplained)`` per rounding, or None for one that has
    no graph value of its shape (the graph and the model round different tensors)."""
    found: list[tuple[int, int, int] | None] = []

    def hook(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
        index = len(found)
        if index >= len(values) or tuple(values[index].shape) != tuple(x.shape):
            found.append(None)
            return rounded
        graph = torch.from_numpy(values[index]).to(rounded.dtype)
        delta = rtol * float(x.abs().max()) if x.numel() else 0.0
        low = (x - delta).to(torch.bfloat16).to(x.dtype)
        high = (x + delta).to(torch.bfloat16).to(x.dtype)
        reachable = (graph >= low) & (graph <= high)
        differ = (graph != rounded) & ~(graph.isnan() & rounded.isnan())
        found.append((x.numel(), int((differ & reachable).sum()), int((differ & ~reachable).sum())))
        return torch.where(reachable, graph, rounded)

    with bfloat16_rounding(hook):
        yield found


class TorchRunner(Runner):
    """A PyTorch module on CPU as a runner (``exporter.backends.runner``): ``infer({name: images})``
    gives the flat outputs as ``output_0``, ``output_1``, ...; after a run ``routing`` holds every
    V-MoE layer's routing and ``routers`` every MoE layer's router outputs (``router_outputs``)."""

    def __init__(self, module: torch.nn.Module, name: str = "pytorch"):
        super().__init__(name)
        self.module = module
        self.routing: dict[str, TopKRouting] = {}
        self.routers: dict[str, dict[str, np.ndarray]] = {}

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (images,) = feed_dict.values()
        with router_outputs(self.module) as routers:
            outputs, self.routing = run_torch(self.module, images)
        self.routers = routers
        return {f"output_{i}": o for i, o in enumerate(outputs)}
