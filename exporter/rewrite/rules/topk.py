"""Top-k MoE layers, found by what they do, whoever wrote them.

**Find.** A router is a softmax over a last axis of E (an ONNX Softmax, or one written by hand) whose
logits come from a MatMul/Gemm/Einsum with a weight, and whose output reaches a top-k choice (TopK or
ArgMax). The layer is the innermost module (torch.onnx's scopes) around the router that also holds the
experts: E sibling modules ``X.0`` ... ``X.{E-1}`` (a ModuleList), or matmuls with ``[E, ...]`` weights
(stacked experts). Its tokens are the router's input, its output the float tensor that leaves the
module downstream of the experts. moe-export's own recorded settings, where the graph has them, are
only tried first: the same check decides.

**Check.** ``exporter.rewrite.topk_semantics`` finds, from the probe's values, the routing group, k,
the order, the capacity (and, when it follows the batch, its rule, pinned down at more batches) and
the combine weights that reproduce what every expert receives and what the layer outputs.

**Rewrite.** The router and the experts stay as they are; ``TopKRoute`` reads the router's
probabilities, ``TopKDispatch`` fills the expert buffers the experts now read (reshaped or split into
the layout they had), ``TopKCombine`` reads their outputs and makes the layer's output. What routed,
dispatched and combined before (one-hots, cumsums, nonzero, scatters, einsums) is left unused and
removed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from exporter.formats.graph import SHAPE_OPS, plugin_stem, routing_output_names
from exporter.rewrite.graph import (
    const_shape,
    const_value,
    detach,
    emit_plugin,
    is_const,
    is_var,
    onnx_dtype,
    producer,
    softmaxes,
)
from exporter.rewrite.plan import Decline, LayerPlan, PluginNode
from exporter.rewrite.rules import Candidate, GraphContext, Probe
from exporter.rewrite.topk_semantics import Match, Observed, identify, pin_capacity

CHOICE_OPS = {"TopK", "ArgMax"}
MATMUL_OPS = {"MatMul", "Gemm", "Einsum"}
#: Largest batch (images) a capacity rule that follows the batch is told apart at.
RULE_CHECK_IMAGES = 256


class TopKRule:
    family = "vmoe"

    def find(self, ctx: GraphContext) -> tuple[list[Candidate], list[LayerPlan]]:
        candidates, declined, layers = [], [], set()
        for router in routers(ctx.graph):
            try:
                candidate = TopKCandidate(ctx, *router)
            except Decline as e:
                where = ctx.path(router[0])
                name = where[-1] if where else router[0].name
                declined.append(LayerPlan(name, self.family, reason=str(e)))
                continue
            if candidate.layer in layers:
                declined.append(LayerPlan(candidate.layer, self.family, reason="two routers in one module"))
                continue
            layers.add(candidate.layer)
            candidates.append(candidate)
        return candidates, declined


def routers(graph: gs.Graph) -> list[tuple[gs.Node, gs.Variable, gs.Variable]]:
    """``(softmax node, probabilities, logits)`` of every softmax over a last axis that reaches a top-k
    choice; the probabilities are what the choice reads (the softmax's output, or the part of it an
    index selects)."""
    found = []
    for sm in softmaxes(graph):
        gates = _chosen_from(sm.output) if sm.last_axis else None
        if gates is not None:
            found.append((sm.node, gates, sm.input))
    return found


def _chosen_from(t: gs.Tensor, depth: int = 4) -> gs.Variable | None:
    """The tensor a TopK/ArgMax reads, reached from ``t`` through reshapes, casts and index selections
    (the last reshape-free tensor before the choice, so that its values are the probabilities)."""
    frontier = [(t, t)]
    for _ in range(depth):
        nxt = []
        for tensor, probs in frontier:
            for node in tensor.outputs:
                if node.inputs[0] is not tensor:
                    continue
                if node.op in CHOICE_OPS:
                    return probs
                if node.op in SHAPE_OPS | {"Cast"}:
                    nxt.extend((o, probs) for o in node.outputs)
                elif node.op in ("Gather", "Slice"):
                    nxt.extend((o, o) for o in node.outputs)
        frontier = nxt
    return None


def _reaches_choice(t: gs.Tensor) -> bool:
    return _chosen_from(t) is not None


class TopKCandidate:
    family = "vmoe"

    def __init__(self, ctx: GraphContext, softmax: gs.Node, gates: gs.Variable, logits: gs.Variable):
        self.ctx, self.gates = ctx, gates
        matmul, self.tokens = _router_matmul(logits)
        path = ctx.path(softmax) or ctx.path(matmul)
        if not path:
            raise Decline("the graph has no module scopes (export it with torch.onnx's dynamo exporter)")
        self.experts = _expert_count(gates, matmul)
        found = None
        for layer in reversed(path):
            region = [n for n in ctx.graph.nodes if layer in ctx.path(n)]
            if any(n is not softmax and n.op == "Softmax" and _reaches_choice(n.outputs[0]) for n in region):
                break  # the module holds another router: it is above the layer
            found = _find_experts(ctx, region, layer, self.experts, matmul)
            if found:
                break
        if not found:
            raise Decline(f"no experts found around the router in {path[-1]} (E={self.experts})")
        self.layer, self.region = layer, region
        self.stacked, self.expert_in, self.expert_out, expert_nodes = found
        inside = set(map(id, region))
        if any(node.op.startswith("Random") for node in region):
            raise Decline("random ops in eval (a random second-expert or token policy): not deterministic")
        self.output = _layer_output(ctx.graph, region, inside, self.expert_out)
        self.token_sources = [
            t for t in _token_sources(self.tokens, inside, self.expert_in[0].dtype) if ctx.readable(t)
        ]
        self.output_sources = (
            {t.name: t for t in _rounded_copies(self.expert_out[0], inside) if ctx.readable(t)} if self.stacked else {}
        )
        self.eps = _small_constants(region, set(map(id, expert_nodes)))
        self.k_hint = _choices(region, self.experts, set(map(id, expert_nodes)))
        recorded = ctx.recorded.get(self.layer)
        self.hint = _hint(recorded) if recorded else None

    def names(self) -> set[str]:
        names = {self.gates.name, self.output.name, *(t.name for t in self.token_sources)}
        names |= {t.name for t in self.expert_in} | {t.name for t in self.expert_out}
        return names | set(self.output_sources)

    def _observe(self, values: dict[str, np.ndarray], images: int) -> Observed:
        outs = {name: [values[name]] for name in self.output_sources} if self.stacked else {}
        outs.setdefault(self.expert_out[0].name, [values[t.name] for t in self.expert_out])
        return Observed(
            images=images,
            gates=values[self.gates.name],
            tokens={t.name: values[t.name] for t in self.token_sources},
            expert_in=[values[t.name] for t in self.expert_in],
            expert_out=outs,
            output=values[self.output.name],
            stacked=self.stacked,
        )

    def check(self, probe: Probe, rtol: float) -> tuple[LayerPlan, Callable[[gs.Graph], None]]:
        batches = probe.batches[:2]
        seen = [self._observe(probe.at(b), b) for b in batches]
        match = identify(seen, rtol, hint=self.hint, k_hint=self.k_hint, eps=self.eps)
        shapes = {b: probe.at(b) for b in batches}
        if len(set(match.capacities.values())) > 1:  # one group per batch: the capacity follows the batch
            match.semantics = self._capacity_rule(probe, match, seen[0], rtol, shapes)
        semantics = match.semantics
        if self.hint:
            recorded = _recorded_capacity(self.ctx.recorded[self.layer], seen[0], semantics)
            if (self.hint["images"], self.hint["k"]) != (semantics.images, semantics.k) or recorded not in (
                None,
                semantics.capacity,
            ):
                match.notes.append(
                    f"the settings recorded in the graph (capacity {recorded}) are not what it computes "
                    f"(capacity {semantics.capacity}): the graph's are used"
                )
        nodes = [
            PluginNode("TopKRoute", semantics.attrs()),
            PluginNode("TopKDispatch", dict(num_experts=self.experts)),
            PluginNode("TopKCombine", {}),
        ]
        plan = LayerPlan(self.layer, self.family, nodes, semantics=semantics.describe(), notes=match.notes)
        targets = self._targets(match, shapes)  # (a layout the rewrite cannot rebuild declines here, not later)
        return plan, lambda graph: self._apply(graph, match, shapes, targets)

    def _targets(self, match: Match, shapes: dict[int, dict]) -> dict:
        """Reshape targets (the dimension that follows the batch as -1) of the layer's output and of each
        expert input; an expert input that holds only the kept tokens is ``[-1, D]``."""
        batches = sorted(shapes)

        def free(t: gs.Variable) -> np.ndarray:
            return _free_shape([shapes[b][t.name].shape for b in batches])

        dim = shapes[batches[0]][self.tokens.name].shape[-1]
        inputs = [free(t) if match.padded else np.array([-1, dim], np.int64) for t in self.expert_in]
        return dict(output=free(self.output), inputs=inputs)

    def _capacity_rule(self, probe: Probe, match: Match, seen: Observed, rtol: float, shapes: dict):
        """One rule of the group size that gives the capacities seen (and at one more batch), told apart
        from the others that fit where they differ (up to RULE_CHECK_IMAGES images)."""
        from dataclasses import replace

        found = match.semantics
        hint = dict(images=None, k=found.k, batch_priority=found.batch_priority, by_token=found.by_token)
        per_image = seen.tokens_total // seen.images

        def capacity_at(batch: int) -> int:
            shapes[batch] = values = probe.at(batch)
            again = identify([self._observe(values, batch)], rtol, hint=hint, eps=self.eps, only_hint=True)
            return again.semantics.capacity

        observed = {b * per_image: c for b, c in match.capacities.items()}
        for batch in probe.batches[2:3]:
            observed[batch * per_image] = capacity_at(batch)
        sizes = [b * per_image for b in range(probe.multiple, RULE_CHECK_IMAGES + 1, probe.multiple)]
        rule = pin_capacity(observed, lambda size: capacity_at(size // per_image), sizes, self.experts, found.k)
        batches = ", ".join(str(s // per_image) for s in sorted(observed))
        match.notes.append(
            f"capacity rule observed at batches {batches}; every rule that fits them agrees up to "
            f"{RULE_CHECK_IMAGES} images"
        )
        return replace(found, rule=rule)

    # --- the rewrite -----------------------------------------------------------------------------

    def _apply(self, graph: gs.Graph, match: Match, shapes: dict[int, dict], targets: dict) -> None:
        semantics, E = match.semantics, self.experts
        stem = plugin_stem(self.layer)
        batches = sorted(shapes)
        values = shapes[batches[0]]
        dim = values[self.tokens.name].shape[-1]
        tokens_per_group = None
        if semantics.images is not None:
            per_image = values[self.gates.name].size // E // batches[0]
            tokens_per_group = per_image * semantics.images
        groups = [-1, tokens_per_group] if tokens_per_group else [1, -1]

        def grouped(t: gs.Variable, last: int, name: str) -> gs.Variable:
            shape = np.array([*groups, last], np.int64)
            return graph.layer(op="Reshape", inputs=[t, shape], outputs=[gs.Variable(name, dtype=t.dtype)])[0]

        gates3 = grouped(self.gates, E, f"{stem}.gates")
        source = next(t for t in self.token_sources if t.name == match.token_source)
        tokens3 = grouped(source, dim, f"{stem}.tokens")
        expert, slot = (gs.Variable(f"{stem}.{n}", dtype=np.int32) for n in ("expert", "slot"))
        weight, table = (
            gs.Variable(f"{stem}.weight", dtype=np.float32),
            gs.Variable(f"{stem}.slot_token", dtype=np.int32),
        )
        route, dispatch, combine = (
            PluginNode("TopKRoute", semantics.attrs()),
            PluginNode("TopKDispatch", dict(num_experts=E)),
            PluginNode("TopKCombine", {}),
        )
        emit_plugin(graph, route, [gates3], [expert, slot, weight, table], f"{stem}.route")
        buffer = gs.Variable(f"{stem}.expert_in", dtype=source.dtype)
        emit_plugin(graph, dispatch, [tokens3, table], [buffer], f"{stem}.dispatch")

        fixed_capacity = semantics.capacity if semantics.rule is None else None
        if self.stacked:
            self._feed(graph, buffer, self.expert_in[0], targets["inputs"][0], match.layout, fixed_capacity, E, dim)
            out = self.output_sources.get(match.output_source, self.expert_out[0])
            canonical = self._collect(graph, out, match.layout, fixed_capacity, E, dim, f"{stem}.out")
        else:
            for e, t in enumerate(self.expert_in):
                part = graph.layer(
                    op="Gather",
                    inputs=[buffer, np.array(e, np.int64)],
                    outputs=[gs.Variable(f"{stem}.in{e}", dtype=buffer.dtype)],
                    attrs={"axis": 0},
                )[0]
                self._feed(graph, part, t, targets["inputs"][e], "e", None, 1, dim)
            dtype = self.expert_out[0].dtype
            parts = [
                graph.layer(
                    op="Reshape",
                    inputs=[t, np.array([1, -1, dim], np.int64)],
                    outputs=[gs.Variable(f"{stem}.out{e}", dtype=dtype)],
                )[0]
                for e, t in enumerate(self.expert_out)
            ]
            canonical = graph.layer(
                op="Concat", inputs=parts, outputs=[gs.Variable(f"{stem}.expert_out", dtype=dtype)], attrs={"axis": 0}
            )[0]

        combined = gs.Variable(f"{stem}.combined", dtype=canonical.dtype or source.dtype)
        emit_plugin(graph, combine, [canonical, slot, weight], [combined], f"{stem}.combine")
        detach(self.output)
        graph.layer(op="Reshape", inputs=[combined, targets["output"]], outputs=[self.output])
        self._routing_outputs(graph, expert, slot, table, stem)

    def _feed(self, graph, buffer, expert_input, target, layout, capacity, experts, dim) -> None:
        """Makes ``expert_input`` (what the experts read) from the plugin's ``[E, G*C, D]`` buffer (or one
        expert's ``[G*C, D]``), in the layout it had (``target``: its shape, -1 where the batch goes)."""
        if layout == "g":  # [E, G*C, D] -> [G, E, C, D]
            buffer = _regroup(graph, buffer, [experts, -1, capacity, dim], f"{expert_input.name}.regrouped")
        detach(expert_input)
        graph.layer(op="Reshape", inputs=[buffer, target], outputs=[expert_input])

    def _collect(self, graph, out, layout, capacity, experts, dim, name) -> gs.Variable:
        """The experts' outputs as ``[E, G*C, D]`` for the combine."""
        if layout == "g":  # [G, E, C, D] -> [E, G*C, D]
            out = _regroup(graph, out, [-1, experts, capacity, dim], name)
        target = np.array([experts, -1, dim], np.int64)
        return graph.layer(op="Reshape", inputs=[out, target], outputs=[gs.Variable(name, dtype=out.dtype)])[0]

    def _routing_outputs(self, graph, expert, slot, table, stem) -> None:
        """moe-export's routing outputs of this layer (``--routing-outputs``), if the graph has them, from
        the plugin's: the expert index (int64 as before), and the buffer position (-1 dropped)."""
        outputs = {t.name: t for t in graph.outputs}
        expert_name, kept_name, slot_name = routing_output_names(self.layer)
        if expert_name not in outputs:
            return
        expert_t, kept_t, slot_t = outputs[expert_name], outputs[kept_name], outputs[slot_name]
        for t in (expert_t, kept_t, slot_t):
            detach(t)
        graph.layer(op="Cast", inputs=[expert], outputs=[expert_t], attrs={"to": onnx_dtype(expert_t)})
        # C = the slot table's width / E (it may follow the batch)
        width = graph.layer(op="Shape", inputs=[table], outputs=[f"{stem}.table_shape"], attrs={"start": 1, "end": 2})[
            0
        ]
        capacity = graph.layer(
            op="Div", inputs=[width, np.array([self.experts], np.int64)], outputs=[f"{stem}.capacity"]
        )[0]
        capacity = graph.layer(op="Cast", inputs=[capacity], outputs=[f"{stem}.capacity32"], attrs={"to": 6})[0]
        base = graph.layer(op="Mul", inputs=[expert, capacity], outputs=[f"{stem}.base"])[0]
        position = graph.layer(op="Sub", inputs=[slot, base], outputs=[f"{stem}.position"])[0]
        kept = graph.layer(op="GreaterOrEqual", inputs=[slot, np.array(0, np.int32)], outputs=[f"{stem}.kept"])[0]
        graph.layer(op="Cast", inputs=[kept], outputs=[kept_t], attrs={"to": onnx_dtype(kept_t)})
        buffer = graph.layer(op="Where", inputs=[kept, position, slot], outputs=[f"{stem}.buffer"])[0]
        graph.layer(op="Cast", inputs=[buffer], outputs=[slot_t], attrs={"to": onnx_dtype(slot_t)})


# --- finding the pieces --------------------------------------------------------------------------


def _router_matmul(logits: gs.Variable) -> tuple[gs.Node, gs.Variable]:
    """The MatMul/Gemm/Einsum that makes the router logits (through reshapes, casts and a bias) and the
    tokens it reads."""
    t = logits
    for _ in range(6):
        node = producer(t)
        if node is None:
            break
        if node.op in MATMUL_OPS:
            data = [i for i in node.inputs if is_var(i) and not is_const(i)]
            if len(data) == 1:
                return node, data[0]
            break
        if node.op in SHAPE_OPS | {"Cast"} or (node.op in ("Add", "Mul") and any(is_const(i) for i in node.inputs)):
            t = next(i for i in node.inputs if is_var(i) and not is_const(i))
            continue
        break
    raise Decline("the router's logits do not come from a matmul of the tokens with a weight")


def _expert_count(gates: gs.Variable, matmul: gs.Node) -> int:
    shape = gates.shape
    if shape and isinstance(shape[-1], int) and shape[-1] > 1:
        return int(shape[-1])
    for i in matmul.inputs:
        shape = const_shape(i)
        if shape is not None and len(shape) >= 2:
            return int(shape[-1] if matmul.op != "Gemm" or not matmul.attrs.get("transB") else shape[0])
    raise Decline("the router's number of experts is not known from the graph")


def _weight(node: gs.Node) -> tuple | None:
    """The shape of a matmul's constant operand (its weight), if it has one."""
    for i in node.inputs:
        shape = const_shape(i)
        if shape is not None:
            return shape
    return None


def _find_experts(ctx: GraphContext, region, layer: str, experts: int, router: gs.Node):
    """``(stacked, expert inputs, expert outputs, expert nodes)`` in ``region``: E sibling modules ``X.0``
    .. ``X.{E-1}`` each a subgraph with one input and one output, or one subgraph of matmuls with
    ``[E, ...]`` weights."""
    paths = {p for n in region for p in ctx.path(n) if p.startswith(layer)}
    parents: dict[str, set[int]] = {}
    for p in paths:
        head, _, index = p.rpartition(".")
        if index.isdigit():
            parents.setdefault(head, set()).add(int(index))
    for parent, indices in parents.items():
        if indices != set(range(experts)):
            continue
        ins, outs, members = [], [], []
        for e in range(experts):
            nodes = [n for n in region if f"{parent}.{e}" in ctx.path(n)]
            if not any(n.op in MATMUL_OPS and _weight(n) is not None for n in nodes):
                break
            boundary = _boundary(nodes, ctx.graph)
            if boundary is None:
                break
            members += nodes
            ins.append(boundary[0])
            outs.append(boundary[1])
        else:
            return False, ins, outs, members
    stacked = [
        n
        for n in region
        if n is not router and n.op in MATMUL_OPS and (w := _weight(n)) is not None and len(w) >= 3 and w[0] == experts
    ]
    if not stacked:
        return None
    order = {id(n): i for i, n in enumerate(ctx.graph.nodes)}
    stacked.sort(key=lambda n: order[id(n)])
    data = [i for i in stacked[0].inputs if is_var(i) and not is_const(i)]
    if len(data) != 1:
        return None
    start, end = _before_qdq(data[0]), stacked[-1].outputs[0]
    while (
        len(end.outputs) == 1
        and end.outputs[0].op in ("Add", "Mul")
        and any((v := const_shape(i)) is not None and len(v) >= 2 and v[0] == experts for i in end.outputs[0].inputs)
    ):
        end = end.outputs[0].outputs[0]
    nodes = _between(start, end)
    if not nodes:
        return None
    inside = set(map(id, nodes))
    for n in nodes:
        for i in n.inputs:
            if is_var(i) and i is not start and not is_const(i) and id(producer(i)) not in inside:
                raise Decline(f"the stacked experts read {i.name} besides their input")
    return True, [start], [end], nodes


def _before_qdq(t: gs.Variable) -> gs.Variable:
    """The float tensor a QuantizeLinear/DequantizeLinear pair quantizes (a quantized graph's expert
    input: the Q/DQ stay with the experts), or ``t`` itself."""
    dq = producer(t)
    q = producer(dq.inputs[0]) if dq is not None and dq.op == "DequantizeLinear" else None
    return q.inputs[0] if q is not None and q.op == "QuantizeLinear" and is_var(q.inputs[0]) else t


def _boundary(nodes, graph) -> tuple[gs.Variable, gs.Variable] | None:
    """The one float tensor entering and the one leaving a subgraph (constants aside). Nodes torch.onnx
    left outside the module's scope but that only read the subgraph (a chunk's Split) join it."""
    inside = set(map(id, nodes))
    grew = True
    while grew:
        grew = False
        for n in list(nodes):
            for t in n.inputs:
                source = producer(t) if is_var(t) else None
                if source is None or id(source) in inside:
                    continue
                reads_inside = all(is_const(i) or (is_var(i) and id(producer(i)) in inside) for i in source.inputs)
                if reads_inside and source.inputs:
                    nodes.append(source)
                    inside.add(id(source))
                    grew = True
    outputs = set(map(id, graph.outputs))
    ins, outs = {}, {}
    for n in nodes:
        for t in n.inputs:
            if is_var(t) and not is_const(t) and id(producer(t)) not in inside:
                ins[t.name] = t
        for t in n.outputs:
            if id(t) in outputs or any(id(c) not in inside for c in t.outputs):
                outs[t.name] = t
    return (next(iter(ins.values())), next(iter(outs.values()))) if len(ins) == 1 and len(outs) == 1 else None


def _between(start: gs.Variable, end: gs.Variable) -> list[gs.Node]:
    """The nodes on paths from ``start`` to ``end``."""
    down, frontier = set(), [start]
    while frontier:
        t = frontier.pop()
        for n in t.outputs:
            if id(n) not in down:
                down.add(id(n))
                frontier.extend(n.outputs)
    up, nodes, frontier = set(), [], [end]
    while frontier:
        t = frontier.pop()
        n = producer(t)
        if n is None or id(n) in up or id(n) not in down:
            continue
        up.add(id(n))
        nodes.append(n)
        frontier.extend(i for i in n.inputs if is_var(i))
    return nodes


def _layer_output(graph, region, inside: set[int], expert_out) -> gs.Variable:
    """The float tensor the layer hands on: made inside the module, read outside it, after the experts."""
    outputs = set(map(id, graph.outputs))
    downstream, frontier = set(), list(expert_out)
    while frontier:
        t = frontier.pop()
        for n in t.outputs:
            if id(n) in inside and id(n) not in downstream:
                downstream.add(id(n))
                frontier.extend(n.outputs)
    leaving = {
        t.name: t
        for n in region
        if id(n) in downstream
        for t in n.outputs
        if not t.name.startswith("routing.")
        and (id(t) in outputs or any(id(c) not in inside for c in t.outputs))
        and _is_float(t.dtype)
    }
    if len(leaving) != 1:
        raise Decline(f"expected one output of the layer after its experts, found {len(leaving)}")
    return next(iter(leaving.values()))


def _is_float(dtype) -> bool:
    """A float dtype, as graphsurgeon gives it: a NumPy dtype, or the ONNX type number it has no NumPy
    type for (bfloat16)."""
    if dtype is None:
        return False
    if isinstance(dtype, int):
        return dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return bool(np.issubdtype(np.dtype(dtype), np.floating))


def _token_sources(tokens: gs.Variable, inside: set[int], expert_dtype) -> list[gs.Variable]:
    """The tensors the experts may have received, of the router's tokens: those tokens, what they were
    cast from (a reduced-precision graph feeds its FP32 router a Cast), and their rounded copies;
    those of the experts' own type first."""
    found = _rounded_copies(tokens, inside)
    source = producer(tokens)
    if source is not None and source.op == "Cast" and is_var(source.inputs[0]):
        found = _rounded_copies(source.inputs[0], inside) + found
    found = list({t.name: t for t in found}.values())
    return sorted(found, key=lambda t: t.dtype != expert_dtype)


def _rounded_copies(t: gs.Variable, inside: set[int]) -> list[gs.Variable]:
    """``t`` and the copies of it the layer makes by casting (bfloat16 dispatch rounds through a Cast pair)."""
    found, frontier = [t], [t]
    for _ in range(2):
        nxt = []
        for tensor in frontier:
            for n in tensor.outputs:
                if n.op == "Cast" and id(n) in inside:
                    found.append(n.outputs[0])
                    nxt.append(n.outputs[0])
        frontier = nxt
    return found


def _small_constants(region, experts: set[int]) -> list[tuple[float, str]]:
    """``(value, op)`` of the positive float scalars below 1e-3 that the routing adds (Add) or clamps with
    (Max, Clip): a renormalisation's eps."""
    found = []
    for n in region:
        if id(n) in experts or n.op not in ("Add", "Max", "Clip"):
            continue
        for i in n.inputs:
            value = const_value(i)
            if value is not None and value.size == 1 and np.issubdtype(value.dtype, np.floating):
                v = float(value.reshape(-1)[0])
                if 0 < v < 1e-3:
                    found.append((v, n.op))
    return found


def _choices(region, experts: int, expert_nodes: set[int]) -> int | None:
    """k as the graph shows it: the experts its top-k ops choose per token (ArgMax 1, TopK its constant
    k) over a last axis of E, outside the experts; None where a TopK's k is not a constant."""
    k = 0
    for n in region:
        if id(n) in expert_nodes or n.op not in CHOICE_OPS:
            continue
        shape = n.inputs[0].shape
        if not shape or shape[-1] != experts:
            continue
        axis = n.attrs.get("axis", -1)
        if axis not in (-1, len(shape) - 1):
            continue  # e.g. DeepSpeed's TopK over the tokens, which picks who keeps a slot
        if n.op == "ArgMax":
            k += 1
        elif (value := const_value(n.inputs[1])) is not None and value.size == 1:
            k += int(value.reshape(-1)[0])
        else:
            return None
    return k or None


def _recorded_capacity(recorded: dict, seen: Observed, semantics) -> int | None:
    """The capacity moe-export's recorded settings give the layer's groups, or None if they cannot say."""
    from exporter.models.routing import compute_capacity

    if recorded.get("capacity"):
        return int(recorded["capacity"])
    images = recorded.get("group_images")
    if not images or recorded.get("capacity_factor") is None:
        return None
    per_group = seen.tokens_total // seen.images * images
    return compute_capacity(
        per_group * int(recorded["k"]),
        seen.experts,
        recorded["capacity_factor"],
        recorded.get("ceil_or_round", "ceil"),
        recorded.get("multiple_of"),
    )


def _hint(recorded: dict) -> dict:
    return dict(
        images=recorded.get("group_images"),
        k=int(recorded["k"]),
        batch_priority=bool(recorded.get("batch_priority")),
        by_token=False,
    )


def _regroup(graph: gs.Graph, t: gs.Variable, shape: list[int], name: str) -> gs.Variable:
    """``t`` reshaped to four dimensions and its first two swapped ([E, G, C, D] <-> [G, E, C, D])."""
    split = graph.layer(
        op="Reshape", inputs=[t, np.array(shape, np.int64)], outputs=[gs.Variable(f"{name}.split", dtype=t.dtype)]
    )[0]
    swapped = gs.Variable(f"{name}.swapped", dtype=t.dtype)
    return graph.layer(op="Transpose", inputs=[split], outputs=[swapped], attrs={"perm": [1, 0, 2, 3]})[0]


def _free_shape(shapes: list[tuple]) -> np.ndarray:
    """A Reshape target for a tensor seen with ``shapes`` at two or more batches: the one dimension that
    follows the batch becomes -1 (one batch: a graph whose batch is fixed, the shape itself)."""
    first = list(shapes[0])
    if len(shapes) == 1:  # a graph with a fixed batch: a fixed shape
        return np.array(first, np.int64)
    moving = [i for i, d in enumerate(first) if any(s[i] != d for s in shapes[1:])]
    if len(moving) != 1:
        raise Decline(f"{len(moving)} dimensions of a {len(first)}-d tensor of the layer follow the batch; expected 1")
    first[moving[0]] = -1
    return np.array(first, np.int64)
