"""Launch a plugin kernel from torch tensors following its :class:`~plugins.recipe.KernelRecipe`."""

from __future__ import annotations

from collections.abc import Sequence

from plugins.recipe import KernelRecipe

_DTYPES = {"float32", "float16", "bfloat16", "int32"}


def dtype_name(tensor) -> str:
    """``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"int32"`` for a torch tensor; anything else is refused."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"unsupported dtype {tensor.dtype}; the kernels take float32, float16, bfloat16 and int32")
    return name


def run(kernel, recipe: KernelRecipe, inputs: Sequence, outputs: Sequence) -> None:
    """``kernel[grid](*inputs, *scalars, *outputs, **constexprs)``; checks dtypes against the recipe."""
    for tensor, (name, dtype) in zip([*inputs, *outputs], [*recipe.inputs, *recipe.outputs], strict=True):
        if dtype_name(tensor) != dtype:
            raise TypeError(f"{recipe.kernel}: {name} must be {dtype}, got {tensor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError(f"{recipe.kernel}: {name} must be contiguous")
    grid = tuple(int(g) for g in recipe.grid)
    if min(grid) == 0:
        return  # nothing to compute (an empty tensor)
    kernel[grid](
        *inputs,
        *recipe.scalar_values,
        *outputs,
        **recipe.constexprs,
        num_warps=recipe.num_warps,
        num_stages=recipe.num_stages,
    )
