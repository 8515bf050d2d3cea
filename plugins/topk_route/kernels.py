"""Triton kernel of ``moe::TopKRoute``: programs over (routing group, block of tokens), exact.

Program (g, b) routes the ``BLOCK_S`` tokens of block b of group g. It needs, for every token of
the group, its top-k experts and (BPR) its priority; rather than wait for other programs (no grid-wide
barrier in one launch), it recomputes them from the gates, tile by tile (E floats per token: the
gates are the smallest tensor here). Per pass ``c`` in order, the buffer position of (token i, c)
is the number of earlier-pass choices of the same expert in the whole group plus the same-pass
choices of that expert by tokens that go before i, "before" being token order (vanilla) or
descending top-1 gate with ties to the lower token (Batch Prioritized Routing), counted exactly by
blocked pairwise comparison: equal gates and equal experts need no sort. With ``BY_TOKEN`` a token's
choices go together (loop-style layers): the position counts the earlier tokens that chose the expert
in any pass, and passes add no offset. Kept choices write ``slot``, ``weight`` (the raw gate, or
renormalised over the chosen or kept gates: ``NORM``) and the slot table; each program also empties
its share of the table's unfilled slots (slot p of expert e is filled exactly when p < the group's
choices of e), so no write races another.

Work per group is k·S² comparisons, as before, spread over cdiv(S, BLOCK_S) programs instead of one:
at V-MoE B/16 (S = 1,576) 25 programs per group, at 384 px (S = 4,616) 73. Exactly
:func:`exporter.models.routing.route_top_k` for finite gates.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from plugins.launch import run
from plugins.recipe import KernelRecipe, cdiv, next_pow2, require_static
from plugins.topk_route.capacity import capacity as capacity_of
from plugins.topk_route.spec import DEFAULTS, NORMALIZE

if TYPE_CHECKING:
    import torch

triton = tl = None  # bound on first use by _kernels(): importing this module needs no triton
_top_k = _column = None  # the kernel's @triton.jit helpers, bound there too

BLOCK_S = 64


@functools.cache
def _kernels() -> dict:
    global triton, tl, _top_k, _column  # Triton resolves a kernel's helpers among the module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _top_k(x, K: tl.constexpr, BLOCK_K: tl.constexpr, cols):
        """Experts ``[BLOCK_S, BLOCK_K]`` (choice c in column c; ties to the lower expert) and the top-1 gate."""
        picks = tl.zeros([x.shape[0], BLOCK_K], tl.int32)
        ks = tl.arange(0, BLOCK_K)
        top1 = tl.max(x, axis=1)
        for c in tl.static_range(K):
            best = tl.max(x, axis=1)
            idx = tl.min(tl.where(x == best[:, None], cols[None, :], x.shape[1]), axis=1)
            picks = tl.where(ks[None, :] == c, idx[:, None], picks)
            x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)
        return picks, top1

    @triton.jit
    def _column(m, c: tl.constexpr):
        ks = tl.arange(0, m.shape[1])
        return tl.sum(tl.where(ks[None, :] == c, m, 0), axis=1)

    @triton.jit
    def topk_route_kernel(
        gates_ptr,
        S,
        E,
        C,
        expert_ptr,
        slot_ptr,
        weight_ptr,
        slot_token_ptr,
        K: tl.constexpr,
        BPR: tl.constexpr,
        BY_TOKEN: tl.constexpr,
        NORM: tl.constexpr,
        EPS: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        g = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        gates = gates_ptr + g * S * E
        expert = expert_ptr + g * S * K
        slot = slot_ptr + g * S * K
        weight = weight_ptr + g * S * K
        table = slot_token_ptr + g * E * C
        rows = tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_E)
        ks = tl.arange(0, BLOCK_K)
        ce = cols < E

        # this block's tokens: their top-k experts (ties to the lower expert) and priority
        i = b * BLOCK_S + rows
        mi = i < S
        xi = tl.load(gates + i[:, None] * E + cols[None, :], mask=mi[:, None] & ce[None, :], other=float("-inf"))
        mine, pi = _top_k(xi, K, BLOCK_K, cols)

        # every token of the group, tile by tile: the choices of the same expert that go before mine
        # (same pass, or with BY_TOKEN any pass of an earlier token), and per-pass counts
        same = tl.zeros([BLOCK_S, BLOCK_K], tl.int32)  # [token, pass]
        counts = tl.zeros([BLOCK_K, BLOCK_E], tl.int32)  # [pass, expert] over the whole group
        for j0 in range(0, S, BLOCK_S):
            j = j0 + rows
            mj = j < S
            xj = tl.load(gates + j[:, None] * E + cols[None, :], mask=mj[:, None] & ce[None, :], other=float("-inf"))
            theirs, pj = _top_k(xj, K, BLOCK_K, cols)
            before = j[None, :] < i[:, None]
            if BPR:
                before = (pj[None, :] > pi[:, None]) | ((pj[None, :] == pi[:, None]) & before)
            before = before & mj[None, :]
            for c in tl.static_range(K):
                ei = _column(mine, c)
                ej = _column(theirs, c)
                if BY_TOKEN:
                    hits = tl.zeros([BLOCK_S], tl.int32)
                    for c2 in tl.static_range(K):
                        ej2 = _column(theirs, c2)
                        hits += tl.sum((before & (ej2[None, :] == ei[:, None])).to(tl.int32), axis=1)
                else:
                    hits = tl.sum((before & (ej[None, :] == ei[:, None])).to(tl.int32), axis=1)
                same += tl.where(ks[None, :] == c, hits[:, None], 0)
                chose = tl.sum(((cols[None, :] == ej[:, None]) & mj[:, None]).to(tl.int32), axis=0)
                counts += tl.where(ks[:, None] == c, chose[None, :], 0)

        # positions pass by pass: earlier passes' choices of the expert (none with BY_TOKEN), then
        # the ones before mine
        offset = tl.zeros([BLOCK_E], tl.int32)
        chosen = tl.zeros([BLOCK_S, BLOCK_K], tl.float32)  # my chosen gates, and which are kept
        kept_all = tl.zeros([BLOCK_S, BLOCK_K], tl.int32)
        for c in tl.static_range(K):
            ei = _column(mine, c)
            onehot = (cols[None, :] == ei[:, None]) & mi[:, None]
            position = _column(same, c)
            if not BY_TOKEN:
                position += tl.sum(tl.where(onehot, offset[None, :], 0), axis=1)
            kept = (position < C) & mi
            flat = ei * C + position
            gate = tl.load(gates + i * E + ei, mask=mi, other=0.0)
            tl.store(expert + i * K + c, ei, mask=mi)
            tl.store(slot + i * K + c, tl.where(kept, flat, -1), mask=mi)
            tl.store(table + flat, i, mask=kept)
            chosen = tl.where(ks[None, :] == c, gate[:, None], chosen)
            kept_all = tl.where(ks[None, :] == c, kept.to(tl.int32)[:, None], kept_all)
            offset += tl.sum(tl.where(ks[:, None] == c, counts, 0), axis=0)

        # combine weights: the raw gate, or renormalised (the k gates added in choice order)
        if NORM != 0:
            summed = tl.where(kept_all != 0, chosen, 0.0) if NORM == 3 else chosen
            total = _column(summed, 0)
            for c in tl.static_range(1, K):
                total = total + _column(summed, c)
            denom = total + EPS if NORM == 1 else tl.maximum(total, EPS)
        for c in tl.static_range(K):
            gate = _column(chosen, c)
            if NORM != 0:
                gate = tl.div_rn(gate, denom)
            tl.store(weight + i * K + c, tl.where(_column(kept_all, c) != 0, gate, 0.0), mask=mi)

        # this program's share of the slot table: the slots no choice fills (p >= the expert's total)
        slots = E * C
        share = tl.cdiv(slots, tl.num_programs(1))
        for t0 in range(b * share, tl.minimum((b + 1) * share, slots), BLOCK_S):
            t = t0 + rows
            mt = (t < (b + 1) * share) & (t < slots)
            total_e = tl.sum(tl.where(cols[None, :] == (t // C)[:, None], offset[None, :], 0), axis=1)
            tl.store(table + t, tl.full([BLOCK_S], -1, tl.int32), mask=mt & (t % C >= total_e))

    return {"topk_route_kernel": topk_route_kernel}


def recipe(groups, tokens, num_experts: int, k: int, capacity, batch_priority: int, **attrs) -> KernelRecipe:
    """Launch plan for gates ``[groups, tokens, num_experts]``; ``num_experts`` must be a build-time int.

    ``capacity`` is the slots per expert (an int or a symbolic dimension); ``attrs`` the node's other
    attributes (``by_token``, ``normalize``, ``eps``)."""
    attrs = {**DEFAULTS, **attrs}
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and the number of experts ({num_experts}), got {k}")
    if isinstance(capacity, int) and capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if attrs["normalize"] not in NORMALIZE:
        raise ValueError(f"normalize must be one of {sorted(NORMALIZE)}, got {attrs['normalize']}")
    norm = int(attrs["normalize"])
    return KernelRecipe(
        kernel="topk_route_kernel",
        inputs=(("gates_ptr", "float32"),),
        scalars=(("S", tokens), ("E", num_experts), ("C", capacity)),
        outputs=(
            ("expert_ptr", "int32"),
            ("slot_ptr", "int32"),
            ("weight_ptr", "float32"),
            ("slot_token_ptr", "int32"),
        ),
        constexprs={
            "K": int(k),
            "BPR": int(bool(batch_priority)),
            "BY_TOKEN": int(bool(attrs["by_token"])),
            "NORM": norm,
            "EPS": float(attrs["eps"]) if norm else 0.0,  # one compiled variant for all raw-gate layers
            "BLOCK_E": next_pow2(num_experts),
            "BLOCK_S": BLOCK_S,
            "BLOCK_K": next_pow2(int(k)),
        },
        grid=(groups, cdiv(tokens, BLOCK_S), 1),
        num_warps=4,
    )


def node_recipe(shapes, dtype: str, k: int, capacity: int, batch_priority: int, **attrs) -> KernelRecipe:
    """The recipe of a ``TopKRoute`` node from its input shapes (ints or ShapeExprs) and attributes:
    what ``aot_impl`` compiles and what a deploy bundle precompiles (gates are always float32).
    ``capacity`` 0 evaluates the node's capacity rule on the group size (``capacity.capacity``;
    ``smax``/``smin`` in ``attrs`` give a symbolic size's maximum and minimum)."""
    groups, tokens, experts = shapes[0]
    num_experts = require_static(experts, "TopKRoute's number of experts (last gates dimension)")
    smax, smin = attrs.pop("smax", max), attrs.pop("smin", min)
    slots = capacity_of(tokens, {**attrs, "capacity": capacity}, smax=smax, smin=smin)
    return recipe(groups, tokens, num_experts, k, slots, batch_priority, **attrs)


def kernel(name: str = "topk_route_kernel"):
    return _kernels()[name]


def launch(gates: torch.Tensor, k: int, capacity: int, batch_priority: int, out=None, **attrs):
    """``(expert, slot, weight, slot_token)`` for gates ``[G, S, E]`` float32, on the gates' device.

    ``out`` may give the four output tensors to write (TensorRT's, in the JIT implementation);
    ``capacity`` 0 takes the capacity rule in ``attrs`` (the node's ``cap_*``).
    """
    import torch  # here: the recipes above are read without torch (the V3 plugins at run time)

    groups, tokens, num_experts = gates.shape
    capacity = capacity_of(tokens, {**attrs, "capacity": capacity})
    plan = recipe(groups, tokens, num_experts, k, capacity, batch_priority, **attrs)
    new = functools.partial(torch.empty, device=gates.device)
    outs = out or (
        new((groups, tokens, k), dtype=torch.int32),
        new((groups, tokens, k), dtype=torch.int32),
        new((groups, tokens, k), dtype=torch.float32),
        new((groups, num_experts * capacity), dtype=torch.int32),
    )
    run(kernel(), plan, [gates], outs)
    return outs
