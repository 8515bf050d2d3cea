"""Triton kernel of ``moe::SoftCombine``: per image, ``combine @ slot_out`` with ``tl.dot``.

A program owns ``BLOCK_M`` tokens by ``BLOCK_D`` columns of one image and walks the slots in
``BLOCK_S`` steps, gathering slot rows from the ``[B, S, D]`` or expert-major ``[n, B*p, D]``
layout; float32 accumulation, ``ieee`` for float32 and TF32 for float16 slot outputs (as
``SoftDispatch``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from plugins.launch import dtype_name, run
from plugins.recipe import KernelRecipe, cdiv, next_pow2, require_static, static_dim

if TYPE_CHECKING:
    import torch

triton = tl = None  # bound on first use by _kernels(): importing this module needs no triton


@functools.cache
def _kernels() -> dict:
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def soft_combine_kernel(
        slot_out_ptr,
        combine_ptr,
        B,
        M,
        S,
        P,
        D,
        y_ptr,
        EXPERT_MAJOR: tl.constexpr,
        TF32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mm = m < M
        md = d < D
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ms = s < S
            w = tl.load(
                combine_ptr + b * M * S + m[:, None] * S + s[None, :], mask=mm[:, None] & ms[None, :], other=0.0
            )
            row = ((s // P) * B + b) * P + s % P if EXPERT_MAJOR else b * S + s
            v = tl.load(
                slot_out_ptr + row.to(tl.int64)[:, None] * D + d[None, :], mask=ms[:, None] & md[None, :], other=0.0
            )
            if TF32:
                acc = tl.dot(w, v.to(tl.float32), acc, input_precision="tf32")
            else:
                acc = tl.dot(w, v.to(tl.float32), acc, input_precision="ieee")
        y = y_ptr + (b * M + m)[:, None] * D + d[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & md[None, :])

    return {"soft_combine_kernel": soft_combine_kernel}


def recipe(dtype: str, images, tokens, dim, slots, num_experts: int, expert_major: int) -> KernelRecipe:
    """Launch plan for combine ``[images, tokens, slots]`` and slot outputs of ``dtype`` with ``dim`` columns."""
    s = static_dim(slots)
    if num_experts < 1 or (s is not None and s % num_experts):
        raise ValueError(f"{slots} slots do not split into {num_experts} experts")
    d = static_dim(dim)
    block_d = min(64, max(16, next_pow2(d))) if d else 64
    block_s = min(64, max(16, next_pow2(s))) if s else 64
    return KernelRecipe(
        kernel="soft_combine_kernel",
        inputs=(("slot_out_ptr", dtype), ("combine_ptr", "float32")),
        scalars=(("B", images), ("M", tokens), ("S", slots), ("P", slots // num_experts), ("D", dim)),
        outputs=(("y_ptr", dtype),),
        constexprs={
            "EXPERT_MAJOR": int(bool(expert_major)),
            "TF32": int(dtype != "float32"),
            "BLOCK_M": 64,
            "BLOCK_S": block_s,
            "BLOCK_D": block_d,
        },
        grid=(images, cdiv(tokens, 64), cdiv(dim, block_d)),
        num_warps=4,
    )


def node_recipe(shapes, dtype: str, num_experts: int, expert_major: int) -> KernelRecipe:
    """The recipe of a ``SoftCombine`` node from its input shapes (slot_out, combine), token dtype
    and attributes: what ``aot_impl`` compiles and what a deploy bundle precompiles."""
    images, tokens, slots = shapes[1]
    slots = require_static(slots, "SoftCombine's number of slots")
    return recipe(dtype, images, tokens, shapes[0][2], slots, num_experts, expert_major)


def kernel(name: str = "soft_combine_kernel"):
    return _kernels()[name]


def launch(
    slot_out: torch.Tensor, combine: torch.Tensor, num_experts: int, expert_major: int, out=None
) -> torch.Tensor:
    """Tokens ``[B, m, D]`` in the dtype of ``slot_out``."""
    import torch  # here: the recipes above are read without torch (the V3 plugins at run time)

    images, tokens, slots = combine.shape
    dim = slot_out.shape[2]
    expected = (num_experts, images * (slots // num_experts), dim) if expert_major else (images, slots, dim)
    if slots % num_experts or tuple(slot_out.shape) != expected:
        raise ValueError(f"slot_out {tuple(slot_out.shape)} does not fit combine {tuple(combine.shape)}")
    plan = recipe(dtype_name(slot_out), images, tokens, dim, slots, num_experts, expert_major)
    y = torch.empty((images, tokens, dim), dtype=slot_out.dtype, device=slot_out.device) if out is None else out
    run(kernel(), plan, [slot_out, combine], [y])
    return y
