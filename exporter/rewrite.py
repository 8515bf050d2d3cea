"""Portable ONNX -> plugin ONNX: each MoE layer's routing, dispatch and combine become ``moe::`` plugin nodes.

How a layer is found, and why it is safe to replace:

* **V-MoE** layers are found by the exporter's scope metadata (``<layer>.routing`` / ``.dispatch`` /
  ``.combine`` on every node) and the layer's routing settings stored in the graph. The boundary
  tensors (router probabilities, the routing decisions, the tokens, the expert inputs and outputs,
  the combined tokens) are picked among the tensors crossing each scope by value.
* **Soft-MoE** layers are found by op pattern, whoever wrote them: two Softmax nodes over one logits
  tensor (reshapes and transposes allowed between), each feeding a MatMul or Einsum (the slot mix and
  the token mix). Axis orders, ``[E, p, d]`` slot parameters, normalisation variants and ModuleList
  experts only change what sits around that pattern.
* Every candidate is then **checked by value**: the graph runs once in ONNX Runtime on random
  images with the candidate tensors exposed, and a layer is replaced only if the plugins' reference
  semantics reproduce those tensors (exactly for routing decisions, to 1e-4 of scale for floats).
  A layer that fails a check is reported with the reason and left as standard ONNX.

Each plugin node has ``op_type`` = plugin name, ``domain`` = ``plugin_namespace`` = ``moe`` and
``aot=1``, and a model-local function of the same name holding its standard-op decomposition, so ONNX
Runtime runs the result and TensorRT without the plugins still builds it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from exporter import settings
from exporter.errors import UserError
from exporter.fileio import atomic_dir
from plugins import NAMESPACE
from plugins.onnx_function import PARSER_ATTRIBUTES

REWRITE_KEY = "moe_export.rewrite"
VMOE_PLUGINS = ("TopKRoute", "TopKDispatch", "TopKCombine")
SOFT_PLUGINS = ("SoftRoute", "SoftDispatch", "SoftCombine")
PLUGIN_ROLE = dict(zip(VMOE_PLUGINS + SOFT_PLUGINS, ("routing", "dispatch", "combine") * 2))
_SHAPE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
_MIX_OPS = {"MatMul", "Einsum"}


@dataclass
class PluginNode:
    plugin: str
    attrs: dict

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.plugin}({args})" if args else self.plugin


@dataclass
class LayerPlan:
    """One MoE layer the rewrite replaces (``nodes``) or declines (``reason``)."""

    layer: str
    family: str
    nodes: list[PluginNode] = field(default_factory=list)
    reason: str | None = None
    apply: Callable[[gs.Graph], None] | None = field(default=None, repr=False)

    @property
    def replaced(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict:
        out = dict(layer=self.layer, family=self.family, replaced=self.replaced)
        if self.replaced:
            out["plugins"] = [dict(plugin=n.plugin, role=PLUGIN_ROLE[n.plugin], attrs=n.attrs) for n in self.nodes]
        else:
            out["reason"] = self.reason
        return out


@dataclass
class RewriteResult:
    source: Path
    path: Path | None
    layers: list[LayerPlan]
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Replacements per plugin kind."""
        counts = {p: 0 for p in VMOE_PLUGINS + SOFT_PLUGINS}
        for layer in self.layers:
            for node in layer.nodes if layer.replaced else []:
                counts[node.plugin] += 1
        return {p: n for p, n in counts.items() if n}

    @property
    def declined(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if not layer.replaced]

    def to_dict(self) -> dict:
        return dict(
            source=str(self.source),
            path=str(self.path) if self.path else None,
            seconds=round(self.seconds, 3),
            counts=self.counts,
            layers=[layer.to_dict() for layer in self.layers],
            op_counts=self.op_counts,
        )


class _Decline(Exception):
    """A candidate layer that does not meet a precondition; the message is the reason."""


# --- graph helpers ---------------------------------------------------------------------------------


def _is_var(t) -> bool:
    return isinstance(t, gs.Variable)


def _producer(t: gs.Tensor):
    return t.inputs[0] if t.inputs else None


def _back_chain(t: gs.Tensor) -> list[gs.Tensor]:
    """``t`` and the tensors it was reshaped or transposed from, nearest first."""
    chain = [t]
    while (node := _producer(chain[-1])) is not None and node.op in _SHAPE_OPS and _is_var(node.inputs[0]):
        chain.append(node.inputs[0])
    return chain


def _forward_chain(t: gs.Tensor, graph: gs.Graph) -> list[gs.Tensor]:
    """``t`` and what it is only reshaped or transposed into (single consumers, not graph outputs)."""
    chain = [t]
    outputs = set(map(id, graph.outputs))
    while True:
        last = chain[-1]
        if id(last) in outputs or len(last.outputs) != 1:
            return chain
        node = last.outputs[0]
        if node.op not in _SHAPE_OPS or node.inputs[0] is not last or len(node.outputs) != 1:
            return chain
        chain.append(node.outputs[0])


def _mix_consumer(t: gs.Tensor) -> tuple[gs.Node, gs.Tensor]:
    """The one MatMul/Einsum that consumes ``t`` (through reshapes/transposes), and the tensor it reads."""
    found, seen, frontier = [], set(), [t]
    while frontier:
        tensor = frontier.pop()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in _MIX_OPS:
                found.append((node, tensor))
            elif node.op in _SHAPE_OPS and node.inputs[0] is tensor:
                frontier.extend(node.outputs)
    if len(found) != 1:
        raise _Decline(f"softmax output {t.name} feeds {len(found)} MatMul/Einsum nodes, expected 1")
    return found[0]


def _detach(t: gs.Variable) -> None:
    """Cuts ``t`` from its producer (which keeps a renamed copy), so a new node can produce ``t``."""
    node = _producer(t)
    if node is not None:
        node.outputs[node.outputs.index(t)] = gs.Variable(f"{t.name}.replaced", dtype=t.dtype, shape=t.shape)


def _node_scopes(proto: onnx.ModelProto) -> dict[str, str]:
    return {
        n.name: next((p.value for p in n.metadata_props if p.key == "namespace"), "")
        for n in proto.graph.node
        if n.name
    }


def _module_path(namespace: str) -> list[str]:
    """``": a.B/blocks.1: c.D/blocks.1.mlp: e.F/op: aten.x"`` -> ``["blocks.1", "blocks.1.mlp"]``."""
    parts = [p.split(":")[0].strip() for p in namespace.split("/")[:-1]]
    return [p for p in parts if p]


# --- the probe: one ONNX Runtime run exposing candidate tensors ----------------------------------------


def _probe_batch(proto: onnx.ModelProto) -> tuple[str, list[int]]:
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"expected one image input, the graph has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for i, d in enumerate(dims):
        if d.dim_value:
            shape.append(d.dim_value)
        elif i == 0:
            match = re.match(r"\s*(\d+)\s*\*", d.dim_param or "")
            multiple = int(match.group(1)) if match else 1
            shape.append(multiple if multiple > 1 else settings.DEFAULT_VALIDATE_BATCH_IMAGES)
        else:
            raise UserError(
                f"input {inputs[0].name} has a dynamic dimension {i} ({d.dim_param}); only the batch may be"
            )
    return inputs[0].name, shape


def _probe(path: Path, proto: onnx.ModelProto, names: set[str], seed: int) -> dict[str, np.ndarray]:
    """Values of the tensors ``names`` for random images (the graph's own batch rule)."""
    import onnxruntime as ort

    input_name, shape = _probe_batch(proto)
    images = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(names))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    with contextlib.ExitStack() as stack:
        if external:  # relative weight paths resolve from the model's folder
            fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=path.parent)
            os.close(fd)
            stack.callback(os.unlink, tmp)
            onnx.save(probe, tmp)
            session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        else:
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(None, {input_name: images})
    return dict(zip(sorted(names), values))


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> bool:
    """Float values equal to ``expected`` within ``rtol`` of its scale (the parity check's measure)."""
    from exporter.parity import compare_output

    return np.issubdtype(actual.dtype, np.floating) and compare_output("probe", expected, actual, rtol).passed


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --- V-MoE ------------------------------------------------------------------------------------------


def _vmoe_layers(proto: onnx.ModelProto) -> dict[str, dict]:
    from exporter.export import VMOE_LAYERS_KEY

    meta = {p.key: p.value for p in proto.metadata_props}
    return json.loads(meta.get(VMOE_LAYERS_KEY, "{}"))


class _VMoEMatch:
    """One V-MoE layer: candidate tensors from the scopes, then a check by value."""

    def __init__(self, graph: gs.Graph, scopes: dict[str, str], layer: str, config: dict):
        self.layer, self.config = layer, config
        self.regions = {}
        for part in ("routing", "dispatch", "combine"):
            tag = f"/{layer}.{part}: "
            nodes = [n for n in graph.nodes if tag in scopes.get(n.name, "")]
            if not nodes:
                raise _Decline(f"no nodes in scope {layer}.{part} (was the graph exported by moe-export?)")
            self.regions[part] = nodes
        routing = self.regions["routing"]
        inside = set(map(id, routing))
        argmax = [n for n in routing if n.op == "ArgMax" and id(_producer(n.inputs[0])) not in inside]
        gates = {id(n.inputs[0]): n.inputs[0] for n in argmax}
        if len(gates) != 1:
            raise _Decline(
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
                if _is_var(t) and id(_producer(t)) not in inside:
                    ins[t.name] = t
            for t in node.outputs:
                if id(t) in graph_outputs or any(id(c) not in inside for c in t.outputs):
                    outs[t.name] = t
        return list(ins.values()), list(outs.values())

    def names(self) -> set[str]:
        names = {self.gates.name}
        for ins, outs in self.crossing.values():
            names |= {t.name for t in ins + outs if _producer(t) is not None}
        return names

    def check(self, values: dict[str, np.ndarray]) -> tuple[LayerPlan, Callable]:
        import torch

        from exporter.models.vmoe import Combine, Dispatch
        from exporter.routing import compute_capacity, route_top_k

        c = self.config
        gates = values[self.gates.name]
        if gates.ndim != 3 or gates.shape[-1] != c["num_experts"]:
            raise _Decline(f"router probabilities have shape {gates.shape}, expected [G, S, {c['num_experts']}]")
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
                    not exact and _close(v.reshape(expected.shape), expected)
                ):
                    return t
            raise _Decline(f"no tensor leaving {self.layer} matches the reference {what} (capacity {capacity})")

        _, routing_out = self.crossing["routing"]
        expert = find(routing_out, ref.expert.numpy(), "expert choices", exact=True)
        slot = find([t for t in routing_out if t is not expert], ref.slot.numpy(), "buffer slots", exact=True)
        weight = find(routing_out, ref.weight.numpy(), "combine weights", exact=True)

        dispatch_in, dispatch_out = self.crossing["dispatch"]
        xs = [t for t in dispatch_in if values.get(t.name) is not None and values[t.name].ndim == 3]
        xs = [t for t in xs if values[t.name].shape[:2] == (groups, tokens) and values[t.name].dtype.kind == "f"]
        if not xs:
            raise _Decline(f"no [G, S, D] token tensor enters {self.layer}.dispatch")
        x = xs[0]
        expert_in = Dispatch()(torch.from_numpy(values[x.name]).float(), ref, experts, capacity).numpy()
        dispatched = find(dispatch_out, expert_in, "expert inputs", exact=False)
        dim = expert_in.shape[-1]

        combine_in, combine_out = self.crossing["combine"]
        rows = groups * capacity
        outs = [t for t in combine_in if values.get(t.name) is not None and values[t.name].shape[:2] == (experts, rows)]
        for expert_out in outs:
            y = Combine()(torch.from_numpy(values[expert_out.name]).float(), ref, capacity).numpy()
            with contextlib.suppress(_Decline):
                combined = find(combine_out, y, "combined tokens", exact=False)
                break
        else:
            raise _Decline(f"no tensor leaving {self.layer}.combine matches the reference combine")

        nodes = [
            PluginNode("TopKRoute", dict(k=k, capacity=capacity, batch_priority=int(bpr))),
            PluginNode("TopKDispatch", dict(num_experts=experts)),
            PluginNode("TopKCombine", dict(capacity=capacity)),
        ]

        def apply(graph: gs.Graph) -> None:
            stem = f"{self.layer}.moe"
            e32 = gs.Variable(f"{stem}.expert", dtype=np.int32, shape=expert.shape)
            s32 = gs.Variable(f"{stem}.slot", dtype=np.int32, shape=expert.shape)
            table = gs.Variable(f"{stem}.slot_token", dtype=np.int32)
            for t in (weight, dispatched, combined, expert, slot):
                _detach(t)
            _plugin(graph, nodes[0], [self.gates], [e32, s32, weight, table], f"{stem}.route")
            for t, canonical, plugin, inputs in (
                (dispatched, (experts, groups * capacity, dim), nodes[1], [x, table]),
                (combined, (groups, tokens, dim), nodes[2], [expert_out, s32, weight]),
            ):
                shape = values[t.name].shape
                out = t if shape == canonical else gs.Variable(f"{t.name}.{plugin.plugin}", dtype=t.dtype)
                _plugin(graph, plugin, inputs, [out], f"{stem}.{PLUGIN_ROLE[plugin.plugin]}")
                if out is not t:
                    prefix = experts if plugin.plugin == "TopKDispatch" else 1
                    graph.layer(op="Reshape", inputs=[out, _batch_free(shape, prefix, groups)], outputs=[t])
            # The layer's routing decisions as the model had them (buffer position, int64), for
            # anything else that reads them, e.g. the routing outputs validate compares.
            graph.layer(op="Cast", inputs=[e32], outputs=[expert], attrs={"to": _onnx_dtype(expert)})
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
            graph.layer(op="Cast", inputs=[buffer], outputs=[slot], attrs={"to": _onnx_dtype(slot)})

        plan = LayerPlan(self.layer, "vmoe", nodes)
        return plan, apply


def _onnx_dtype(t: gs.Variable) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))


def _plugin(graph: gs.Graph, node: PluginNode, inputs: list, outputs: list, name: str) -> None:
    attrs = {**node.attrs, **PARSER_ATTRIBUTES}
    graph.layer(op=node.plugin, name=name, domain=NAMESPACE, inputs=inputs, outputs=outputs, attrs=attrs)


# --- Soft-MoE -----------------------------------------------------------------------------------------


class _SoftMatch:
    """Two Softmax nodes over one logits tensor, each feeding a MatMul/Einsum mix."""

    def __init__(self, graph: gs.Graph, scopes: dict[str, str], dispatch_sm: gs.Node, combine_sm: gs.Node):
        logits = combine_sm.inputs[0]
        if logits.shape is None or len(logits.shape) != 3 or combine_sm.attrs.get("axis", -1) not in (-1, 2):
            raise _Decline("no softmax normalises the last axis of a [B, m, S] logits tensor (the combine)")
        self.logits = logits
        self.dispatch_mix, dispatch_w = _mix_consumer(dispatch_sm.outputs[0])
        self.combine_mix, combine_w = _mix_consumer(combine_sm.outputs[0])
        self.combine_sm = combine_sm
        x_in = next(t for t in self.dispatch_mix.inputs if t is not dispatch_w)
        u_in = next(t for t in self.combine_mix.inputs if t is not combine_w)
        self.xs = _back_chain(x_in)
        self.slots = _forward_chain(self.dispatch_mix.outputs[0], graph)
        self.us = _back_chain(u_in)
        self.ys = _forward_chain(self.combine_mix.outputs[0], graph)
        paths = [
            _module_path(scopes.get(n.name, "")) for n in (dispatch_sm, combine_sm, self.dispatch_mix, self.combine_mix)
        ]
        common = [p[0] for p in zip(*paths) if len(set(p)) == 1]
        self.layer = common[-1] if common else f"softmax pair {dispatch_sm.name}/{combine_sm.name}"

    def names(self) -> set[str]:
        return {t.name for t in [self.logits, *self.xs, *self.slots, *self.us, *self.ys]}

    def check(self, values: dict[str, np.ndarray]) -> tuple[LayerPlan, Callable]:
        logits = values[self.logits.name].astype(np.float64)
        images, tokens, slots = logits.shape
        dispatch, combine = _softmax(logits, 1), _softmax(logits, 2)

        # The slot mix: slots = dispatchᵀ·x, image-major [B, S, D] or expert-major [n, B*p, D].
        for x in self.xs:
            xv = values[x.name]
            if xv.size % (images * tokens) or xv.shape[0] != images:
                continue
            mixed = np.einsum("bms,bmd->bsd", dispatch, xv.reshape(images, tokens, -1).astype(np.float64))
            found = self._layout(self.slots, values, mixed, prefer_last=True)
            if found:
                slots_t, slots_layout = found
                break
        else:
            raise _Decline("no MatMul/Einsum computes softmax-over-tokens(logits)ᵀ · x")
        dim = mixed.shape[-1]

        # The token mix: y = combine · slot outputs (read as far back as the expert outputs themselves).
        for u in reversed(self.us):
            uv = values[u.name].astype(np.float64)
            if uv.size != images * slots * dim:
                continue
            for layout in self._layouts(uv, images, slots, prefer=slots_layout[1]):
                canonical = _to_canonical(uv, layout, images, slots, dim)
                y = np.einsum("bms,bsd->bmd", combine, canonical)
                found = self._layout(self.ys, values, y, prefer_last=True, image_major_only=True)
                if found:
                    y_t, u_layout = found[0], layout
                    break
            else:
                continue
            break
        else:
            raise _Decline("no MatMul/Einsum computes softmax-over-slots(logits) · expert outputs")

        experts = (
            slots_layout[1]
            if slots_layout[0]
            else (u_layout[1] if u_layout[0] else _guess_experts(values[slots_t.name], images, slots))
        )
        nodes = [
            PluginNode("SoftRoute", {}),
            PluginNode("SoftDispatch", dict(num_experts=experts, expert_major=int(slots_layout[0]))),
            PluginNode("SoftCombine", dict(num_experts=experts, expert_major=int(u_layout[0]))),
        ]
        x_shape, u_shape = values[x.name].shape, values[u.name].shape
        slots_shape, y_shape = values[slots_t.name].shape, values[y_t.name].shape

        def apply(graph: gs.Graph) -> None:
            stem = f"{self.layer}.moe"
            combine_t = self.combine_sm.outputs[0]
            d32 = gs.Variable(f"{stem}.dispatch", dtype=np.float32, shape=self.logits.shape)
            _detach(combine_t)
            _plugin(graph, nodes[0], [self.logits], [d32, combine_t], f"{stem}.route")
            x_in = _reshaped(graph, x, x_shape, (images, tokens, dim), [-1, tokens, dim], f"{stem}.x")
            canonical_slots = (experts, images * slots // experts, dim) if slots_layout[0] else (images, slots, dim)
            _detach(slots_t)
            out = (
                slots_t if tuple(slots_shape) == canonical_slots else gs.Variable(f"{stem}.slots", dtype=slots_t.dtype)
            )
            _plugin(graph, nodes[1], [x_in, d32], [out], f"{stem}.dispatch")
            if out is not slots_t:
                prefix = experts if slots_layout[0] else 1
                graph.layer(op="Reshape", inputs=[out, _batch_free(slots_shape, prefix, images)], outputs=[slots_t])
            canonical_u = (experts, images * slots // experts, dim) if u_layout[0] else (images, slots, dim)
            target = [experts, -1, dim] if u_layout[0] else [-1, slots, dim]
            u_in = _reshaped(graph, u, u_shape, canonical_u, target, f"{stem}.slot_out")
            _detach(y_t)
            y_out = y_t if tuple(y_shape) == (images, tokens, dim) else gs.Variable(f"{stem}.y", dtype=y_t.dtype)
            _plugin(graph, nodes[2], [u_in, combine_t], [y_out], f"{stem}.combine")
            if y_out is not y_t:
                graph.layer(op="Reshape", inputs=[y_out, _batch_free(y_shape, 1, images)], outputs=[y_t])

        return LayerPlan(self.layer, "soft_moe", nodes), apply

    @staticmethod
    def _layouts(value: np.ndarray, images: int, slots: int, prefer: int | None):
        """Candidate layouts ``(expert_major, experts)`` of a slots tensor: image-major first."""
        yield (False, None)
        if value.ndim >= 2 and value.shape[0] != images and slots % value.shape[0] == 0:
            yield (True, int(value.shape[0]))
        elif prefer and value.shape[0] == prefer:
            yield (True, prefer)

    def _layout(self, chain, values, expected, *, prefer_last: bool, image_major_only: bool = False):
        images, slots, dim = expected.shape
        for t in reversed(chain) if prefer_last else chain:
            v = values[t.name]
            if v.size != expected.size:
                continue
            layouts = [(False, None)] if image_major_only else list(self._layouts(v, images, slots, None))
            for layout in layouts:
                if _close(_to_canonical(v.astype(np.float64), layout, images, slots, dim), expected):
                    return t, layout
        return None


def _to_canonical(value: np.ndarray, layout, images: int, slots: int, dim: int) -> np.ndarray:
    expert_major, experts = layout
    if not expert_major:
        return value.reshape(images, slots, dim)
    return value.reshape(experts, images, slots // experts, dim).transpose(1, 0, 2, 3).reshape(images, slots, dim)


def _guess_experts(value: np.ndarray, images: int, slots: int) -> int:
    """Experts of an image-major slots tensor, for the record: ``[B, n, p, D]`` says ``n``; else 1."""
    return int(value.shape[1]) if value.ndim == 4 and value.shape[0] == images and slots % value.shape[1] == 0 else 1


def _batch_free(shape, prefix: int, images: int) -> np.ndarray:
    """``shape`` with the batch-carrying dimension as -1 (the one after ``prefix`` leading elements)."""
    shape = list(shape)
    for i in range(len(shape)):
        if math.prod(shape[:i]) == prefix and shape[i] % images == 0:
            shape[i] = -1
            return np.array(shape, np.int64)
    raise _Decline(f"cannot reshape the plugin output to {tuple(shape)} without fixing the batch size")


def _reshaped(graph: gs.Graph, t: gs.Variable, shape, canonical, target, name: str) -> gs.Variable:
    if tuple(shape) == tuple(canonical):
        return t
    return graph.layer(
        op="Reshape", inputs=[t, np.array(target, np.int64)], outputs=[gs.Variable(name, dtype=t.dtype)]
    )[0]


class _Either:
    """Both readings of a softmax pair (which one is the dispatch); the first that checks out wins."""

    def __init__(self, options: list[_SoftMatch]):
        self.options = options
        self.layer = options[0].layer

    def names(self) -> set[str]:
        return set().union(*(o.names() for o in self.options))

    def check(self, values):
        reasons = []
        for option in self.options:
            try:
                return option.check(values)
            except _Decline as e:
                reasons.append(str(e))
        raise _Decline("; ".join(dict.fromkeys(reasons)))


def _soft_candidates(graph: gs.Graph, scopes: dict[str, str]) -> tuple[list[_Either], list[LayerPlan]]:
    by_root: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op == "Softmax" and _is_var(node.inputs[0]):
            by_root.setdefault(_back_chain(node.inputs[0])[-1].name, []).append(node)
    matches, declined = [], []
    for nodes in by_root.values():
        if len(nodes) != 2:
            continue
        options, reasons = [], []
        for dispatch_sm, combine_sm in (nodes, nodes[::-1]):
            try:
                options.append(_SoftMatch(graph, scopes, dispatch_sm, combine_sm))
            except _Decline as e:
                reasons.append(str(e))
        if options:
            matches.append(_Either(options))
        else:
            reason = "; ".join(dict.fromkeys(reasons))
            declined.append(LayerPlan(f"softmax pair {nodes[0].name}/{nodes[1].name}", "soft_moe", reason=reason))
    return matches, declined


# --- the rewrite --------------------------------------------------------------------------------------


def plan_rewrite(
    path: str | Path, *, seed: int = settings.DEFAULT_SEED
) -> tuple[onnx.ModelProto, gs.Graph, list[LayerPlan]]:
    """Finds and checks every MoE layer of a portable graph; nothing is changed yet."""
    from exporter.runners import read_onnx_header

    path = Path(path)
    proto = read_onnx_header(path)
    if any(n.domain == NAMESPACE for n in proto.graph.node):
        raise UserError(f"{path} already holds {NAMESPACE}:: plugin nodes (it was rewritten before)")
    graph = gs.import_onnx(proto)
    scopes = _node_scopes(proto)

    plans: list[LayerPlan] = []
    matches: list = []
    vmoe = _vmoe_layers(proto)
    scoped = sorted(
        {m.group(1) for ns in scopes.values() if (m := re.search(r"/([^/:]+)\.routing: \S+TopKRouter", ns))}
    )
    for layer in (layer for layer in scoped if layer not in vmoe):
        reason = "the graph lacks this layer's routing settings (exported by an older moe-export?); export it again"
        plans.append(LayerPlan(layer, "vmoe", reason=reason))
    for layer, config in vmoe.items():
        try:
            matches.append(_VMoEMatch(graph, scopes, layer, config))
        except _Decline as e:
            plans.append(LayerPlan(layer, "vmoe", reason=str(e)))
    soft, declined = _soft_candidates(graph, scopes)
    matches += soft
    plans += declined

    values = _probe(path, proto, set().union(*(m.names() for m in matches)), seed) if matches else {}
    for match in matches:
        try:
            plan, apply = match.check(values)
            plan.apply = apply
        except _Decline as e:
            plan = LayerPlan(match.layer, "vmoe" if isinstance(match, _VMoEMatch) else "soft_moe", reason=str(e))
        plans.append(plan)
    return proto, graph, plans


def rewrite_onnx(
    src: str | Path,
    dest: str | Path | None,
    *,
    plan_only: bool = False,
    seed: int = settings.DEFAULT_SEED,
    step: Callable[[str], ContextManager] = lambda _: contextlib.nullcontext(),
) -> RewriteResult:
    """Rewrites ``src`` into ``dest`` (atomically; checked with onnx.checker), or only plans it.

    Weights stored beside ``src`` as external data are referenced, not loaded: an output beside the
    source shares the weight file, one elsewhere gets a copy.
    """
    from plugins.functions import local_function

    start = time.perf_counter()
    src = Path(src)
    with step("Finding and checking MoE layers (one ONNX Runtime run)"):
        proto, graph, plans = plan_rewrite(src, seed=seed)
    result = RewriteResult(src, None, plans, 0.0)
    if plan_only or dest is None:
        result.seconds = time.perf_counter() - start
        return result

    dest = Path(dest)
    with step("Replacing subgraphs with plugin nodes"):
        for plan in plans:
            if plan.replaced:
                plan.apply(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        used = sorted({n.op for n in graph.nodes if n.domain == NAMESPACE})
        graph.functions = []
        out = gs.export_onnx(graph, do_type_check=False)
        out.functions.extend(local_function(name) for name in used)
        out.ir_version = max(proto.ir_version, 10)
        out.producer_name = proto.producer_name
        del out.metadata_props[:]
        out.metadata_props.extend(proto.metadata_props)
        onnx.helper.set_model_props(
            out, {**{p.key: p.value for p in proto.metadata_props}, REWRITE_KEY: json.dumps(result.counts)}
        )

    with step(f"Writing and checking {dest.name}"), atomic_dir(dest) as tmp:
        path = tmp / dest.name
        external = _external_files(out)
        for location in sorted(external):  # weight files: shared when beside the source, else copied
            if (src.parent / location).resolve() != (dest.parent / location).resolve():
                shutil.copyfile(src.parent / location, tmp / location)
        onnx.save(out, str(path))
        try:  # with external weights, the graph is checked with them as inputs (they were not touched)
            onnx.checker.check_model(_weights_as_inputs(out) if external else str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise RuntimeError(f"the rewritten graph fails onnx.checker: {e}") from e
    from exporter.portable import op_histogram

    result.path = dest
    result.op_counts = dict(sorted(op_histogram(out).items()))
    result.seconds = time.perf_counter() - start
    return result


def _weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the (weightless) graph whose external initializers are graph inputs instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        copy.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        copy.graph.initializer.remove(t)
    return copy


def _external_files(model: onnx.ModelProto) -> set[str]:
    files = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files |= {e.value for e in t.external_data if e.key == "location"}
    return files
