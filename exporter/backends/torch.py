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


SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


@contextlib.contextmanager
def router_probabilities(module: torch.nn.Module, layers: dict[str, int]):
    """``with router_probabilities(model, {layer: E}) as found: model(x)`` fills ``found[layer]`` with the
    first softmax over a last axis of E that the module ``layer`` (or one inside it) computes: the
    router probabilities of a top-k layer whoever wrote it (a TorchFunctionMode sees every
    ``torch.softmax``, ``F.softmax`` and ``Tensor.softmax``; module hooks say whose forward is running)."""
    from torch.overrides import TorchFunctionMode

    names = {id(m): n for n, m in module.named_modules()}
    running: list[str] = []
    found: dict[str, np.ndarray] = {}

    class Softmaxes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in SOFTMAXES and isinstance(out, torch.Tensor) and out.ndim >= 2:
                dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else None)
                if dim in (-1, out.ndim - 1):
                    for layer, experts in layers.items():
                        if layer not in found and out.shape[-1] == experts and layer in running:
                            found[layer] = out.detach().float().numpy().copy()
            return out

    def enter(m, _):
        running.append(names.get(id(m), ""))

    def leave(m, _i, _o):
        running.pop()  # (a hook that returns something replaces the module's output)

    modules = torch.nn.modules.module
    handles = [modules.register_module_forward_pre_hook(enter), modules.register_module_forward_hook(leave)]
    try:
        with Softmaxes():
            yield found
    finally:
        for handle in handles:
            handle.remove()


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

    def __init__(self, module: torch.nn.Module, name: str = "pytorch", probabilities: dict[str, int] | None = None):
        super().__init__(name)
        self.module = module
        self.routing: dict[str, TopKRouting] = {}
        self.routers: dict[str, dict[str, np.ndarray]] = {}
        self.wanted = probabilities or {}  # other authors' top-k layers: {layer: E} (router_probabilities)
        self.probabilities: dict[str, np.ndarray] = {}

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (images,) = feed_dict.values()
        capture = router_probabilities(self.module, self.wanted) if self.wanted else contextlib.nullcontext({})
        with router_outputs(self.module) as routers, capture as probabilities:
            outputs, self.routing = run_torch(self.module, images)
        self.routers, self.probabilities = routers, dict(probabilities)
        return {f"output_{i}": o for i, o in enumerate(outputs)}
