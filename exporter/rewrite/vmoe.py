"""V-MoE layers: found by the exporter's scope metadata and the routing settings stored in the graph."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from exporter.formats.graph import plugin_stem
from exporter.rewrite.graph import batch_free, close, detach, emit_plugin, is_var, onnx_dtype, producer
from exporter.rewrite.plan import Decline, LayerPlan, PluginNode
from plugins import registry


class VMoEMatch:
    """One V-MoE layer: candidate tensors from the scopes, then a check by value."""

    def __init__(self, graph: gs.Graph, scopes: dict[str, str], layer: str, config: dict):
        self.layer, self.config = layer, config
        self.regions = {}
        for part in ("routing", "dispatch", "combine"):
            tag = f"/{layer}.{part}: "
            nodes = [n for n in graph.nodes if tag in scopes.get(n.name, "")]
            if not nodes:
                raise Decline(f"no nodes in scope {layer}.{part} (was the graph exported by moe-export?)")
            self.regions[part] = nodes
        routing = self.regions["routing"]
        inside = set(map(id, routing))
        argmax = [n for n in routing if n.op == "ArgMax" and id(producer(n.inputs[0])) not in inside]
        gates = {id(n.inputs[0]): n.inputs[0] for n in argmax}
        if len(gates) != 1:
            raise Decline(
                f"expected one router-probability tensor read by ArgMax in {layer}.routing, found {len(gates)}"
            )
        self.gates = next(iter(gates.values()))
        outputs = set(map(id, graph.outputs))
        self.crossing = {part: self._crossing(nodes, outputs) for part, nodes in self.regions.items()}

    @staticmethod
    def _crossing(nodes: list[gs.Node], graph_outputs: set[int]) -> tuple[list[gs.Variable], list[gs.Variable]]:
        inside = set(map(id, nodes))
        ins, outs = {}, {}
        for node in nodes:
            for t in node.inputs:
                if is_var(t) and id(producer(t)) not in inside:
                    ins[t.name] = t
            for t in node.outputs:
                if id(t) in graph_outputs or any(id(c) not in inside for c in t.outputs):
                    outs[t.name] = t
        return list(ins.values()), list(outs.values())

    def names(self) -> set[str]:
        names = {self.gates.name}
        for ins, outs in self.crossing.values():
            names |= {t.name for t in ins + outs if producer(t) is not None}
        return names

    def check(self, values: dict[str, np.ndarray], rtol: float) -> tuple[LayerPlan, Callable]:
        import torch

        from exporter.models.routing import compute_capacity, route_top_k
        from exporter.models.vmoe import Combine, Dispatch

        c = self.config
        gates = values[self.gates.name]
        if gates.ndim != 3 or gates.shape[-1] != c["num_experts"]:
            raise Decline(f"router probabilities have shape {gates.shape}, expected [G, S, {c['num_experts']}]")
        groups, tokens, experts = gates.shape
        k, bpr = int(c["k"]), bool(c["batch_priority"])
        capacity = c["capacity"] or compute_capacity(
            tokens * k, experts, c["capacity_factor"], c["ceil_or_round"], c["multiple_of"]
        )
        ref = route_top_k(torch.from_numpy(gates), k, capacity, bpr)

        def find(candidates, expected: np.ndarray, what: str, exact: bool):
            for t in candidates:  # routing decisions: the same shape and values; floats: any reshape of them
                v = values.get(t.name)
                if v is None or (v.shape != expected.shape if exact else v.size != expected.size):
                    continue
                if (exact and np.array_equal(v, expected)) or (
                    not exact and close(v.reshape(expected.shape), expected, rtol)
                ):
                    return t
            raise Decline(f"no tensor leaving {self.layer} matches the reference {what} (capacity {capacity})")

        _, routing_out = self.crossing["routing"]
        expert = find(routing_out, ref.expert.numpy(), "expert choices", exact=True)
        slot = find([t for t in routing_out if t is not expert], ref.slot.numpy(), "buffer slots", exact=True)
        weight = find(routing_out, ref.weight.numpy(), "combine weights", exact=True)

        dispatch_in, dispatch_out = self.crossing["dispatch"]
        xs = [t for t in dispatch_in if values.get(t.name) is not None and values[t.name].ndim == 3]
        xs = [t for t in xs if values[t.name].shape[:2] == (groups, tokens) and values[t.name].dtype.kind == "f"]
        if not xs:
            raise Decline(f"no [G, S, D] token tensor enters {self.layer}.dispatch")
        x = xs[0]
        expert_in = Dispatch()(torch.from_numpy(values[x.name]).float(), ref, experts, capacity).numpy()
        dispatched = find(dispatch_out, expert_in, "expert inputs", exact=False)
        dim = expert_in.shape[-1]

        combine_in, combine_out = self.crossing["combine"]
        rows = groups * capacity
        outs = [t for t in combine_in if values.get(t.name) is not None and values[t.name].shape[:2] == (experts, rows)]
        for expert_out in outs:
            y = Combine()(torch.from_numpy(values[expert_out.name]).float(), ref, capacity).numpy()
            with contextlib.suppress(Decline):
                combined = find(combine_out, y, "combined tokens", exact=False)
                break
        else:
            raise Decline(f"no tensor leaving {self.layer}.combine matches the reference combine")

        nodes = [
            PluginNode("TopKRoute", dict(k=k, capacity=capacity, batch_priority=int(bpr))),
            PluginNode("TopKDispatch", dict(num_experts=experts)),
            PluginNode("TopKCombine", {}),
        ]

        def apply(graph: gs.Graph) -> None:
            stem = plugin_stem(self.layer)
            e32 = gs.Variable(f"{stem}.expert", dtype=np.int32, shape=expert.shape)
            s32 = gs.Variable(f"{stem}.slot", dtype=np.int32, shape=expert.shape)
            table = gs.Variable(f"{stem}.slot_token", dtype=np.int32)
            for t in (weight, dispatched, combined, expert, slot):
                detach(t)
            emit_plugin(graph, nodes[0], [self.gates], [e32, s32, weight, table], f"{stem}.route")
            for t, canonical, plugin, inputs in (
                (dispatched, (experts, groups * capacity, dim), nodes[1], [x, table]),
                (combined, (groups, tokens, dim), nodes[2], [expert_out, s32, weight]),
            ):
                shape = values[t.name].shape
                out = t if shape == canonical else gs.Variable(f"{t.name}.{plugin.plugin}", dtype=t.dtype)
                emit_plugin(graph, plugin, inputs, [out], f"{stem}.{registry.spec(plugin.plugin).role}")
                if out is not t:
                    prefix = experts if plugin.plugin == "TopKDispatch" else 1
                    graph.layer(op="Reshape", inputs=[out, batch_free(shape, prefix, groups)], outputs=[t])
            # The layer's routing decisions as the model had them (buffer position, int64), for
            # anything else that reads them, e.g. the routing outputs validate compares.
            graph.layer(op="Cast", inputs=[e32], outputs=[expert], attrs={"to": onnx_dtype(expert)})
            position = graph.layer(
                op="Sub",
                inputs=[
                    s32,
                    graph.layer(op="Mul", inputs=[e32, np.array(capacity, np.int32)], outputs=[f"{stem}.base"])[0],
                ],
                outputs=[f"{stem}.position"],
            )[0]
            kept = graph.layer(op="GreaterOrEqual", inputs=[s32, np.array(0, np.int32)], outputs=[f"{stem}.kept"])[0]
            buffer = graph.layer(op="Where", inputs=[kept, position, s32], outputs=[f"{stem}.buffer"])[0]
            graph.layer(op="Cast", inputs=[buffer], outputs=[slot], attrs={"to": onnx_dtype(slot)})

        plan = LayerPlan(self.layer, "vmoe", nodes)
        return plan, apply
