"""Triton kernel of ``moe::TopKDispatch``: a row gather through the slot table.

Each program copies ``BLOCK_R`` slot rows by ``BLOCK_D`` columns: one read of each token row a slot
needs, one write of every slot row (zeros for an empty slot, which reads nothing).
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
    def topk_dispatch_kernel(
        x_ptr,
        slot_token_ptr,
        G,
        S,
        E,
        C,
        D,
        out_ptr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # output row e*G*C + g*C + c
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mr = r < E * G * C
        md = d < D
        e = r // (G * C)
        g = (r % (G * C)) // C
        c = r % C
        token = tl.load(slot_token_ptr + g * (E * C) + e * C + c, mask=mr, other=-1)
        src = (g.to(tl.int64) * S + token) * D
        value = tl.load(x_ptr + src[:, None] + d[None, :], mask=(token >= 0)[:, None] & md[None, :], other=0.0)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * D + d[None, :], value, mask=mr[:, None] & md[None, :])

    return {"topk_dispatch_kernel": topk_dispatch_kernel}


def blocks(dim) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)``: up to 256 columns, 2048 elements per program."""
    d = static_dim(dim)
    block_d = min(256, next_pow2(d)) if d else 256
    return max(1, 2048 // block_d), block_d


def recipe(dtype: str, groups, tokens, dim, slots, num_experts: int) -> KernelRecipe:
    """Launch plan for x ``[groups, tokens, dim]`` of ``dtype`` and slot_token ``[groups, slots]``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    capacity = slots // num_experts
    block_r, block_d = blocks(dim)
    return KernelRecipe(
        kernel="topk_dispatch_kernel",
        inputs=(("x_ptr", dtype), ("slot_token_ptr", "int32")),
        scalars=(("G", groups), ("S", tokens), ("E", num_experts), ("C", capacity), ("D", dim)),
        outputs=(("out_ptr", dtype),),
        constexprs={"BLOCK_R": block_r, "BLOCK_D": block_d},
        grid=(cdiv(groups * (capacity * num_experts), block_r), cdiv(dim, block_d), 1),
        num_warps=4,
    )


def node_recipe(shapes, dtype: str, num_experts: int) -> KernelRecipe:
    """The recipe of a ``TopKDispatch`` node from its input shapes (x, slot_token), token dtype and
    attribute: what ``aot_impl`` compiles and what a deploy bundle precompiles."""
    (groups, tokens, dim), (_, slots) = shapes[0], shapes[1]
    return recipe(dtype, groups, tokens, dim, slots, num_experts)


def kernel(name: str = "topk_dispatch_kernel"):
    return _kernels()[name]


def launch(x: torch.Tensor, slot_token: torch.Tensor, num_experts: int, out=None) -> torch.Tensor:
    """Expert inputs ``[E, G*C, D]`` in the dtype of ``x`` (written to ``out`` when given)."""
    import torch  # here: the recipes above are read without torch (the V3 plugins at run time)

    groups, tokens, dim = x.shape
    slots = slot_token.shape[1]
    if slot_token.shape[0] != groups or slots % num_experts:
        raise ValueError(f"slot_token {tuple(slot_token.shape)} does not fit x {tuple(x.shape)} and E={num_experts}")
    plan = recipe(dtype_name(x), groups, tokens, dim, slots, num_experts)
    if out is None:
        out = torch.empty((num_experts, groups * (slots // num_experts), dim), dtype=x.dtype, device=x.device)
    run(kernel(), plan, [x, slot_token], [out])
    return out
