"""Triton kernel of ``moe::TopKCombine``: per token, the gate-weighted sum of its kept choices.

Each program owns ``BLOCK_T`` tokens by ``BLOCK_D`` columns and reads the ``K`` expert rows of its
tokens; accumulation in float32 in a fixed order (no atomics: deterministic). Dropped choices read
nothing.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from plugins.launch import dtype_name, run
from plugins.recipe import KernelRecipe, cdiv, next_pow2, static_dim

if TYPE_CHECKING:
    import torch

triton = tl = None  # bound on first use by _kernels(): importing this module needs no triton


@functools.cache
def _kernels() -> dict:
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def topk_combine_kernel(
        expert_out_ptr,
        slot_ptr,
        weight_ptr,
        G,
        S,
        K,
        C,
        D,
        y_ptr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # token g*S + s
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mt = t < G * S
        md = d < D
        g = t // S
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for c in range(K):
            flat = tl.load(slot_ptr + t * K + c, mask=mt, other=-1)
            w = tl.load(weight_ptr + t * K + c, mask=mt, other=0.0)
            kept = flat >= 0
            row = (flat // C).to(tl.int64) * G * C + g * C + flat % C
            value = tl.load(expert_out_ptr + row[:, None] * D + d[None, :], mask=kept[:, None] & md[None, :], other=0.0)
            acc += tl.where(kept, w, 0.0)[:, None] * value.to(tl.float32)
        tl.store(
            y_ptr + t.to(tl.int64)[:, None] * D + d[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mt[:, None] & md[None, :],
        )

    return {"topk_combine_kernel": topk_combine_kernel}


def blocks(dim) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_D)``: up to 256 columns, 2048 elements per program."""
    d = static_dim(dim)
    block_d = min(256, next_pow2(d)) if d else 256
    return max(1, 2048 // block_d), block_d


def recipe(dtype: str, groups, tokens, k, dim, capacity) -> KernelRecipe:
    """Launch plan for expert_out of ``dtype`` with ``dim`` columns and slot/weight ``[groups, tokens, k]``;
    ``capacity`` (an int or a symbolic dimension) is the rows per expert and group."""
    if isinstance(capacity, int) and capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    block_t, block_d = blocks(dim)
    return KernelRecipe(
        kernel="topk_combine_kernel",
        inputs=(("expert_out_ptr", dtype), ("slot_ptr", "int32"), ("weight_ptr", "float32")),
        scalars=(("G", groups), ("S", tokens), ("K", k), ("C", capacity), ("D", dim)),
        outputs=(("y_ptr", dtype),),
        constexprs={"BLOCK_T": block_t, "BLOCK_D": block_d},
        grid=(cdiv(groups * tokens, block_t), cdiv(dim, block_d), 1),
        num_warps=4,
    )


def node_recipe(shapes, dtype: str) -> KernelRecipe:
    """The recipe of a ``TopKCombine`` node from its input shapes (expert_out, slot, weight) and token
    dtype: what ``aot_impl`` compiles and what a deploy bundle precompiles. The capacity is expert_out's
    rows per group (``[E, G*C, D]``), so it follows a capacity that follows the batch."""
    groups, tokens, k = shapes[1]
    return recipe(dtype, groups, tokens, k, shapes[0][2], shapes[0][1] // groups)


def kernel(name: str = "topk_combine_kernel"):
    return _kernels()[name]


def launch(expert_out: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor, out=None) -> torch.Tensor:
    """Tokens ``[G, S, D]`` in the dtype of ``expert_out`` (written to ``out`` when given)."""
    import torch  # here: the recipes above are read without torch (the V3 plugins at run time)

    num_experts, rows, dim = expert_out.shape
    groups, tokens, k = slot.shape
    capacity = rows // groups
    if capacity < 1 or rows != groups * capacity or weight.shape != slot.shape:
        raise ValueError(
            f"expert_out {tuple(expert_out.shape)}, slot {tuple(slot.shape)} and weight {tuple(weight.shape)} "
            "do not fit (expert_out holds G*C rows per expert)"
        )
    plan = recipe(dtype_name(expert_out), groups, tokens, k, dim, capacity)
    y = torch.empty((groups, tokens, dim), dtype=expert_out.dtype, device=expert_out.device) if out is None else out
    run(kernel(), plan, [expert_out, slot, weight], [y])
    return y
