"""Soft-MoE layers, found by op pattern whoever wrote them: two softmaxes over one logits tensor
(reshapes and transposes allowed between), each feeding a MatMul or Einsum: one over the tokens
(the dispatch), one over the slots (the combine: the last axis of ``[B, m, n*p]``, or the last two of
``[B, m, n, p]``). A softmax is an ONNX Softmax or one written by hand (``exp(x - max) / sum``, as
bwconrad's soft-moe writes it); the logits' normalisation (``F.normalize``: ReduceL2, or
Pow/ReduceSum/Sqrt) stays in the graph, in front of the route plugin."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from exporter.formats.graph import plugin_stem
from exporter.rewrite.graph import (
    SoftmaxMatch,
    back_chain,
    batch_free,
    close,
    detach,
    emit_plugin,
    forward_chain,
    mix_consumer,
    reshaped,
    softmax,
    softmaxes,
)
from exporter.rewrite.plan import Decline, LayerPlan, PluginNode
from exporter.rewrite.rules import GraphContext


class SoftMatch:
    """Two softmaxes over one logits tensor, each feeding a MatMul/Einsum mix."""

    family = "soft_moe"

    def __init__(self, graph: gs.Graph, ctx: GraphContext, dispatch_sm: SoftmaxMatch, combine_sm: SoftmaxMatch):
        logits = combine_sm.input
        rank = combine_sm.rank
        if rank not in (3, 4) or not combine_sm.trailing or len(combine_sm.axes) != rank - 2:
            raise Decline("no softmax normalises the slots of a [B, m, S] or [B, m, n, p] logits tensor (the combine)")
        if dispatch_sm.axes != (1,):
            raise Decline("no softmax normalises the tokens (axis 1) of the logits (the dispatch)")
        self.logits, self.rank = logits, rank
        self.dispatch_mix, dispatch_w = mix_consumer(dispatch_sm.output)
        self.combine_mix, combine_w = mix_consumer(combine_sm.output)
        self.combine_out = combine_sm.output
        x_in = next(t for t in self.dispatch_mix.inputs if t is not dispatch_w)
        u_in = next(t for t in self.combine_mix.inputs if t is not combine_w)
        self.xs = back_chain(x_in)
        self.slots = forward_chain(self.dispatch_mix.outputs[0], graph)
        self.us = back_chain(u_in)
        self.ys = forward_chain(self.combine_mix.outputs[0], graph)
        paths = [ctx.path(n) for n in (dispatch_sm.node, combine_sm.node, self.dispatch_mix, self.combine_mix)]
        common = [p[0] for p in zip(*paths) if len(set(p)) == 1]
        self.layer = common[-1] if common else f"softmax pair {dispatch_sm.node.name}/{combine_sm.node.name}"

    def names(self) -> set[str]:
        return {t.name for t in [self.logits, *self.xs, *self.slots, *self.us, *self.ys]}

    def check(self, probe, rtol: float) -> tuple[LayerPlan, Callable]:
        values = probe.at(probe.batches[0])
        logits = values[self.logits.name].astype(np.float64)
        logits = logits.reshape(*logits.shape[:2], -1)  # [B, m, n, p] -> [B, m, n*p]
        images, tokens, slots = logits.shape
        dispatch, combine = softmax(logits, 1), softmax(logits, 2)

        x, slots_t, slots_layout, mixed = self._slot_mix(values, dispatch, rtol)
        dim = mixed.shape[-1]
        u, y_t, u_layout = self._token_mix(values, combine, dim, slots_layout[1], rtol)

        experts = (
            slots_layout[1]
            if slots_layout[0]
            else (u_layout[1] if u_layout[0] else guess_experts(values[slots_t.name], images, slots))
        )
        nodes = [
            PluginNode("SoftRoute", {}),
            PluginNode("SoftDispatch", dict(num_experts=experts, expert_major=int(slots_layout[0]))),
            PluginNode("SoftCombine", dict(num_experts=experts, expert_major=int(u_layout[0]))),
        ]
        x_shape, u_shape = values[x.name].shape, values[u.name].shape
        slots_shape, y_shape = values[slots_t.name].shape, values[y_t.name].shape

        logits_shape = values[self.logits.name].shape

        def apply(graph: gs.Graph) -> None:
            stem = plugin_stem(self.layer)
            combine_t = self.combine_out
            d32 = gs.Variable(f"{stem}.dispatch", dtype=np.float32)
            detach(combine_t)
            if self.rank == 3:
                logits, c32 = self.logits, combine_t
            else:  # [B, m, n, p]: the route plugin reads [B, m, n*p]; the graph's combine weights keep their shape
                logits = reshaped(graph, self.logits, logits_shape, (), [-1, tokens, slots], f"{stem}.logits")
                c32 = gs.Variable(f"{stem}.combine", dtype=np.float32)
                graph.layer(op="Reshape", inputs=[c32, batch_free(logits_shape, 1, images)], outputs=[combine_t])
            emit_plugin(graph, nodes[0], [logits], [d32, c32], f"{stem}.route")
            x_in = reshaped(graph, x, x_shape, (images, tokens, dim), [-1, tokens, dim], f"{stem}.x")
            canonical_slots = (experts, images * slots // experts, dim) if slots_layout[0] else (images, slots, dim)
            detach(slots_t)
            out = (
                slots_t if tuple(slots_shape) == canonical_slots else gs.Variable(f"{stem}.slots", dtype=slots_t.dtype)
            )
            emit_plugin(graph, nodes[1], [x_in, d32], [out], f"{stem}.dispatch")
            if out is not slots_t:
                prefix = experts if slots_layout[0] else 1
                graph.layer(op="Reshape", inputs=[out, batch_free(slots_shape, prefix, images)], outputs=[slots_t])
            canonical_u = (experts, images * slots // experts, dim) if u_layout[0] else (images, slots, dim)
            target = [experts, -1, dim] if u_layout[0] else [-1, slots, dim]
            u_in = reshaped(graph, u, u_shape, canonical_u, target, f"{stem}.slot_out")
            detach(y_t)
            y_out = y_t if tuple(y_shape) == (images, tokens, dim) else gs.Variable(f"{stem}.y", dtype=y_t.dtype)
            emit_plugin(graph, nodes[2], [u_in, c32], [y_out], f"{stem}.combine")
            if y_out is not y_t:
                graph.layer(op="Reshape", inputs=[y_out, batch_free(y_shape, 1, images)], outputs=[y_t])

        return LayerPlan(self.layer, "soft_moe", nodes), apply

    def _slot_mix(self, values, dispatch: np.ndarray, rtol: float):
        """The slot mix: slots = dispatchᵀ·x, image-major [B, S, D] or expert-major [n, B*p, D]. Returns
        (x, the slots tensor, its layout ``(expert_major, experts)``, dispatchᵀ·x as [B, S, D])."""
        images, tokens, _ = dispatch.shape
        for x in self.xs:
            xv = values[x.name]
            if xv.size % (images * tokens) or xv.shape[0] != images:
                continue
            mixed = np.einsum("bms,bmd->bsd", dispatch, xv.reshape(images, tokens, -1).astype(np.float64))
            found = self._layout(self.slots, values, mixed, rtol, prefer_last=True)
            if found:
                slots_t, slots_layout = found
                return x, slots_t, slots_layout, mixed
        raise Decline("no MatMul/Einsum computes softmax-over-tokens(logits)ᵀ · x")

    def _token_mix(self, values, combine: np.ndarray, dim: int, prefer: int | None, rtol: float):
        """The token mix: y = combine · slot outputs (read as far back as the expert outputs themselves).
        Returns (the slot outputs, y, the slot outputs' layout ``(expert_major, experts)``)."""
        images, _, slots = combine.shape
        for u in reversed(self.us):
            uv = values[u.name].astype(np.float64)
            if uv.size != images * slots * dim:
                continue
            for layout in self._layouts(uv, images, slots, prefer=prefer):
                canonical = to_canonical(uv, layout, images, slots, dim)
                y = np.einsum("bms,bsd->bmd", combine, canonical)
                found = self._layout(self.ys, values, y, rtol, prefer_last=True, image_major_only=True)
                if found:
                    return u, found[0], layout
        raise Decline("no MatMul/Einsum computes softmax-over-slots(logits) · expert outputs")

    @staticmethod
    def _layouts(value: np.ndarray, images: int, slots: int, prefer: int | None):
        """Candidate layouts ``(expert_major, experts)`` of a slots tensor: image-major first."""
        yield (False, None)
        if value.ndim >= 2 and value.shape[0] != images and slots % value.shape[0] == 0:
            yield (True, int(value.shape[0]))
        elif prefer and value.shape[0] == prefer:
            yield (True, prefer)

    def _layout(self, chain, values, expected, rtol: float, *, prefer_last: bool, image_major_only: bool = False):
        images, slots, dim = expected.shape
        for t in reversed(chain) if prefer_last else chain:
            v = values[t.name]
            if v.size != expected.size:
                continue
            layouts = [(False, None)] if image_major_only else list(self._layouts(v, images, slots, None))
            for layout in layouts:
                if close(to_canonical(v.astype(np.float64), layout, images, slots, dim), expected, rtol):
                    return t, layout
        return None


def to_canonical(value: np.ndarray, layout, images: int, slots: int, dim: int) -> np.ndarray:
    expert_major, experts = layout
    if not expert_major:
        return value.reshape(images, slots, dim)
    return value.reshape(experts, images, slots // experts, dim).transpose(1, 0, 2, 3).reshape(images, slots, dim)


def guess_experts(value: np.ndarray, images: int, slots: int) -> int:
    """Experts of an image-major slots tensor, for the record: ``[B, n, p, D]`` says ``n``; else 1."""
    return int(value.shape[1]) if value.ndim == 4 and value.shape[0] == images and slots % value.shape[1] == 0 else 1


class Either:
    """Both readings of a softmax pair (which one is the dispatch); the first that checks out wins."""

    family = "soft_moe"

    def __init__(self, options: list[SoftMatch]):
        self.options = options
        self.layer = options[0].layer

    def names(self) -> set[str]:
        return set().union(*(o.names() for o in self.options))

    def check(self, probe, rtol: float):
        reasons = []
        for option in self.options:
            try:
                return option.check(probe, rtol)
            except Decline as e:
                reasons.append(str(e))
        raise Decline("; ".join(dict.fromkeys(reasons)))


class SoftMoERule:
    family = "soft_moe"

    def find(self, ctx: GraphContext) -> tuple[list[Either], list[LayerPlan]]:
        by_root: dict[str, list[SoftmaxMatch]] = {}
        for sm in softmaxes(ctx.graph):
            by_root.setdefault(back_chain(sm.input)[-1].name, []).append(sm)
        matches, declined = [], []
        for found in by_root.values():
            if len(found) != 2:
                continue
            options, reasons = [], []
            for dispatch_sm, combine_sm in (found, found[::-1]):
                try:
                    options.append(SoftMatch(ctx.graph, ctx, dispatch_sm, combine_sm))
                except Decline as e:
                    reasons.append(str(e))
            if options:
                matches.append(Either(options))
            else:
                reason = "; ".join(dict.fromkeys(reasons))
                names = "/".join(sm.node.name for sm in found)
                declined.append(LayerPlan(f"softmax pair {names}", self.family, reason=reason))
        return matches, declined
