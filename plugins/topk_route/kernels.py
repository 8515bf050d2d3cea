"""Triton kernel of ``moe::TopKRoute``: one program per routing group does the whole routing.

Phases, separated by CTA barriers (global memory written by one thread is read by others):
0. empty the group's slot table;
1. top-k per token over the experts (ties to the lower expert), written to ``expert``;
2. per pass ``c`` in order, the buffer position of every (token, c): the choices of earlier passes
   of the same expert (a running per-expert count) plus the same-pass choices of the same expert by
   tokens that go before it. "Before" is token order (vanilla) or descending top-1 gate with ties to
   the lower token (Batch Prioritized Routing), counted exactly by blocked pairwise comparison, so
   equal gates and equal experts need no sort. Kept choices write ``slot``, ``weight`` and the
   slot table.
Exactly :func:`exporter.routing.route_top_k` for finite gates.
"""

from __future__ import annotations

import functools

import torch

from plugins.launch import run
from plugins.recipe import KernelRecipe, next_pow2, require_static

triton = tl = None  # bound on first use by _kernels(): importing this module needs no triton

BLOCK_S = 64


@functools.cache
def _kernels() -> dict:
    global triton, tl
    import triton
    import triton.language as tl

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
        BLOCK_E: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        g = tl.program_id(0).to(tl.int64)
        gates = gates_ptr + g * S * E
        expert = expert_ptr + g * S * K
        slot = slot_ptr + g * S * K
        weight = weight_ptr + g * S * K
        table = slot_token_ptr + g * E * C
        rows = tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_E)

        # 0. every slot empty
        for t0 in range(0, E * C, BLOCK_S):
            t = t0 + rows
            tl.store(table + t, tl.full([BLOCK_S], -1, tl.int32), mask=t < E * C)

        # 1. top-k experts per token; ties go to the lower expert index
        for s0 in range(0, S, BLOCK_S):
            s = s0 + rows
            ms = s < S
            x = tl.load(
                gates + s[:, None] * E + cols[None, :], mask=ms[:, None] & (cols[None, :] < E), other=float("-inf")
            )
            for c in tl.static_range(K):
                best = tl.max(x, axis=1)
                idx = tl.min(tl.where(x == best[:, None], cols[None, :], BLOCK_E), axis=1)
                tl.store(expert + s * K + c, idx, mask=ms)
                x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)
        tl.debug_barrier()

        # 2. buffer positions, pass by pass
        offset = tl.zeros([BLOCK_E], tl.int32)  # choices of earlier passes, per expert
        for c in tl.static_range(K):
            count = tl.zeros([BLOCK_E], tl.int32)  # choices of this pass, per expert
            for i0 in range(0, S, BLOCK_S):
                i = i0 + rows
                mi = i < S
                ei = tl.load(expert + i * K + c, mask=mi, other=-1, cache_modifier=".cg")
                same = tl.zeros([BLOCK_S], tl.int32)
                if BPR:
                    top_i = tl.load(expert + i * K, mask=mi, other=0, cache_modifier=".cg")
                    pi = tl.load(gates + i * E + top_i, mask=mi, other=0.0)
                    j_end = S
                else:
                    j_end = i0 + BLOCK_S
                for j0 in range(0, j_end, BLOCK_S):
                    j = j0 + rows
                    mj = j < S
                    ej = tl.load(expert + j * K + c, mask=mj, other=-2, cache_modifier=".cg")
                    before = j[None, :] < i[:, None]
                    if BPR:
                        top_j = tl.load(expert + j * K, mask=mj, other=0, cache_modifier=".cg")
                        pj = tl.load(gates + j * E + top_j, mask=mj, other=0.0)
                        before = (pj[None, :] > pi[:, None]) | ((pj[None, :] == pi[:, None]) & before)
                    hit = before & (ej[None, :] == ei[:, None]) & mj[None, :]
                    same += tl.sum(hit.to(tl.int32), axis=1)
                onehot = (cols[None, :] == ei[:, None]) & mi[:, None]
                position = tl.sum(tl.where(onehot, offset[None, :], 0), axis=1) + same
                count += tl.sum(onehot.to(tl.int32), axis=0)
                kept = (position < C) & mi
                flat = ei * C + position
                gate = tl.load(gates + i * E + ei, mask=mi, other=0.0)
                tl.store(slot + i * K + c, tl.where(kept, flat, -1), mask=mi)
                tl.store(weight + i * K + c, tl.where(kept, gate, 0.0), mask=mi)
                tl.store(table + flat, i, mask=kept)
            offset += count

    return {"topk_route_kernel": topk_route_kernel}


def recipe(groups, tokens, num_experts: int, k: int, capacity: int, batch_priority: int) -> KernelRecipe:
    """Launch plan for gates ``[groups, tokens, num_experts]``; ``num_experts`` must be a build-time int."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be between 1 and the number of experts ({num_experts}), got {k}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
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
            "BLOCK_E": next_pow2(num_experts),
            "BLOCK_S": BLOCK_S,
        },
        grid=(groups, 1, 1),
        num_warps=4,
    )


def node_recipe(shapes, dtype: str, k: int, capacity: int, batch_priority: int) -> KernelRecipe:
    """The recipe of a ``TopKRoute`` node from its input shapes (ints or ShapeExprs) and attributes:
    what ``aot_impl`` compiles and what a deploy bundle precompiles (gates are always float32)."""
    groups, tokens, experts = shapes[0]
    num_experts = require_static(experts, "TopKRoute's number of experts (last gates dimension)")
    return recipe(groups, tokens, num_experts, k, capacity, batch_priority)


def kernel(name: str = "topk_route_kernel"):
    return _kernels()[name]


def launch(gates: torch.Tensor, k: int, capacity: int, batch_priority: int, out=None):
    """``(expert, slot, weight, slot_token)`` for gates ``[G, S, E]`` float32, on the gates' device.

    ``out`` may give the four output tensors to write (TensorRT's, in the JIT implementation).
    """
    groups, tokens, num_experts = gates.shape
    plan = recipe(groups, tokens, num_experts, k, capacity, batch_priority)
    new = functools.partial(torch.empty, device=gates.device)
    outs = out or (
        new((groups, tokens, k), dtype=torch.int32),
        new((groups, tokens, k), dtype=torch.int32),
        new((groups, tokens, k), dtype=torch.float32),
        new((groups, num_experts * capacity), dtype=torch.int32),
    )
    run(kernel(), plan, [gates], outs)
    return outs
