"""Triton kernel of ``moe::SoftDispatch``: per image, ``dispatch^T @ x`` with ``tl.dot``.

A program owns ``BLOCK_S`` slots by ``BLOCK_D`` columns of one image and walks the tokens in
``BLOCK_M`` steps, accumulating in float32: exact float32 products (``ieee``) for float32 tokens,
TF32 for float16/bfloat16 tokens (exact for the tokens, the float32 weights rounded to 10 mantissa bits as
float16 would, without float16's underflow). The output row of slot ``s = e*p + q`` of image ``b``
is ``b*S + s`` (``expert_major=0``) or ``(e*B + b)*p + q`` (``expert_major=1``).
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
    def soft_dispatch_kernel(
        x_ptr,
        dispatch_ptr,
        B,
        M,
        S,
        P,
        D,
        out_ptr,
        EXPERT_MAJOR: tl.constexpr,
        TF32: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        ms = s < S
        md = d < D
        acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            mm = m < M
            w = tl.load(
                dispatch_ptr + b * M * S + m[None, :] * S + s[:, None], mask=ms[:, None] & mm[None, :], other=0.0
            )
            x = tl.load(x_ptr + (b * M + m)[:, None] * D + d[None, :], mask=mm[:, None] & md[None, :], other=0.0)
            if TF32:
                acc = tl.dot(w, x.to(tl.float32), acc, input_precision="tf32")
            else:
                acc = tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")
        row = ((s // P) * B + b) * P + s % P if EXPERT_MAJOR else b * S + s
        out = out_ptr + row.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ms[:, None] & md[None, :])

    return {"soft_dispatch_kernel": soft_dispatch_kernel}


def recipe(dtype: str, images, tokens, dim, slots, num_experts: int, expert_major: int) -> KernelRecipe:
    """Launch plan for x ``[images, tokens, dim]`` of ``dtype`` and dispatch ``[images, tokens, slots]``."""
    s = static_dim(slots)
    if num_experts < 1 or (s is not None and s % num_experts):
        raise ValueError(f"{slots} slots do not split into {num_experts} experts")
    d = static_dim(dim)
    block_s = min(128, max(16, next_pow2(s))) if s else 128
    block_d = min(64, max(16, next_pow2(d))) if d else 64
    return KernelRecipe(
        kernel="soft_dispatch_kernel",
        inputs=(("x_ptr", dtype), ("dispatch_ptr", "float32")),
        scalars=(("B", images), ("M", tokens), ("S", slots), ("P", slots // num_experts), ("D", dim)),
        outputs=(("out_ptr", dtype),),
        constexprs={
            "EXPERT_MAJOR": int(bool(expert_major)),
            "TF32": int(dtype != "float32"),
            "BLOCK_S": block_s,
            "BLOCK_M": 32,
            "BLOCK_D": block_d,
        },
        grid=(images, cdiv(slots, block_s), cdiv(dim, block_d)),
        num_warps=4,
    )


def node_recipe(shapes, dtype: str, num_experts: int, expert_major: int) -> KernelRecipe:
    """The recipe of a ``SoftDispatch`` node from its input shapes (x, dispatch), token dtype and
    attributes: what ``aot_impl`` compiles and what a deploy bundle precompiles."""
    images, tokens, dim = shapes[0]
    slots = require_static(shapes[1][2], "SoftDispatch's number of slots")
    return recipe(dtype, images, tokens, dim, slots, num_experts, expert_major)


def kernel(name: str = "soft_dispatch_kernel"):
    return _kernels()[name]


def launch(x: torch.Tensor, dispatch: torch.Tensor, num_experts: int, expert_major: int, out=None) -> torch.Tensor:
    """Slots ``[B, S, D]`` (expert_major=0) or ``[n, B*p, D]`` (expert_major=1) in the dtype of ``x``."""
    import torch  # here: the recipes above are read without torch (the V3 plugins at run time)

    images, tokens, dim = x.shape
    slots = dispatch.shape[2]
    if dispatch.shape[:2] != x.shape[:2]:
        raise ValueError(f"dispatch {tuple(dispatch.shape)} does not fit x {tuple(x.shape)}")
    plan = recipe(dtype_name(x), images, tokens, dim, slots, num_experts, expert_major)
    shape = (num_experts, images * (slots // num_experts), dim) if expert_major else (images, slots, dim)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    run(kernel(), plan, [x, dispatch], [out])
    return out
