"""Triton kernel of ``moe::SoftRoute``: both softmaxes of the router logits in one kernel.

One program per image reads its logits twice. Pass 1, row block by row block: the softmax over the
slots of each row (``combine``, the whole row is in one block) and an online max/sum per slot over
the tokens. Pass 2: ``dispatch = exp(x - max) / sum`` per slot.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from plugins.launch import run
from plugins.recipe import KernelRecipe, next_pow2, require_static, static_dim

if TYPE_CHECKING:
    import torch

triton = tl = None  # bound on first use by _kernels(): importing this module needs no triton

#: Logits per row block (BLOCK_M * BLOCK_S).
TILE = 4096


@functools.cache
def _kernels() -> dict:
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def soft_route_kernel(
        logits_ptr,
        M,
        S,
        dispatch_ptr,
        combine_ptr,
        BLOCK_M: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        base = tl.program_id(0).to(tl.int64) * M * S
        cols = tl.arange(0, BLOCK_S)
        mc = cols < S
        col_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        col_sum = tl.zeros([BLOCK_S], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            mr = rows < M
            mask = mr[:, None] & mc[None, :]
            at = base + rows[:, None] * S + cols[None, :]
            x = tl.load(logits_ptr + at, mask=mask, other=float("-inf"))
            row_max = tl.where(mr, tl.max(x, axis=1), 0.0)
            e = tl.exp(x - row_max[:, None])
            row_sum = tl.where(mr, tl.sum(e, axis=1), 1.0)  # padding rows: no 0/0
            tl.store(combine_ptr + at, e / row_sum[:, None], mask=mask)
            new_max = tl.where(mc, tl.maximum(col_max, tl.max(x, axis=0)), 0.0)
            col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(x - new_max[None, :]), axis=0)
            col_max = new_max
        col_sum = tl.where(mc, col_sum, 1.0)  # padding columns: no 0/0
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            mask = (rows < M)[:, None] & mc[None, :]
            at = base + rows[:, None] * S + cols[None, :]
            x = tl.load(logits_ptr + at, mask=mask, other=float("-inf"))
            tl.store(dispatch_ptr + at, tl.exp(x - col_max[None, :]) / col_sum[None, :], mask=mask)

    return {"soft_route_kernel": soft_route_kernel}


def recipe(images, tokens, slots) -> KernelRecipe:
    """Launch plan for logits ``[images, tokens, slots]``; ``slots`` must be a build-time int."""
    s = static_dim(slots)
    if s is None:
        raise ValueError("SoftRoute needs a static number of slots (the last logits dimension)")
    block_s = next_pow2(s)
    return KernelRecipe(
        kernel="soft_route_kernel",
        inputs=(("logits_ptr", "float32"),),
        scalars=(("M", tokens), ("S", slots)),
        outputs=(("dispatch_ptr", "float32"), ("combine_ptr", "float32")),
        constexprs={"BLOCK_M": max(1, TILE // block_s), "BLOCK_S": block_s},
        grid=(images, 1, 1),
        num_warps=8,
    )


def node_recipe(shapes, dtype: str) -> KernelRecipe:
    """The recipe of a ``SoftRoute`` node from its input shape (logits, always float32): what
    ``aot_impl`` compiles and what a deploy bundle precompiles."""
    images, tokens, slots = shapes[0]
    require_static(slots, "SoftRoute's number of slots (last logits dimension)")
    return recipe(images, tokens, slots)


def kernel(name: str = "soft_route_kernel"):
    return _kernels()[name]


def launch(logits: torch.Tensor, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dispatch, combine)`` for logits ``[B, m, S]`` float32 (written to ``out`` when given)."""
    import torch  # here: the recipes above are read without torch (the V3 plugins at run time)

    images, tokens, slots = logits.shape
    dispatch, combine = out or (torch.empty_like(logits), torch.empty_like(logits))
    run(kernel(), recipe(images, tokens, slots), [logits], [dispatch, combine])
    return dispatch, combine
