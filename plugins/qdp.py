"""Helpers of the ``trt.py`` registrations (TensorRT's Quickly Deployable Plugins).

Imported only by ``plugins/<op>/trt.py``; everything that needs tensorrt or CUDA imports it inside
the function, so that this module imports anywhere.
"""

from __future__ import annotations

import contextlib

from plugins.aot import compiled_kernel, launch_params
from plugins.recipe import KernelRecipe


def dtype_name(trt_dtype) -> str:
    """``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"int32"`` for a ``tensorrt.DataType``."""
    import tensorrt as trt

    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int32: "int32"}
    if trt_dtype not in names:
        raise TypeError(f"unsupported TensorRT dtype {trt_dtype}; the plugins take float32, float16, bfloat16, int32")
    return names[trt_dtype]


def descs(shapes, inputs, **attrs):
    """A plugin's output ``TensorDesc``s from its ``shapes`` module (``plugins/<op>/shapes.py``, which
    the V3 plugins of TensorRT for RTX evaluate too) and its input descs: one, or a tuple of several."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    types = {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16, "int32": trt.int32}
    dims = shapes.output_shapes([x.shape_expr for x in inputs], smax=trtp.max, smin=trtp.min, **attrs)
    dtypes = shapes.output_dtypes([dtype_name(x.dtype) for x in inputs], **attrs)
    out = tuple(trtp.from_shape_expr(tuple(d), dtype=types[t]) for d, t in zip(dims, dtypes, strict=True))
    return out[0] if len(out) == 1 else out


def combinations(pattern: str) -> list:
    """One LINEAR ``AutoTuneCombination`` per token dtype: ``pattern`` has ``{T}`` where FP32|FP16|BF16 go.
    (A strongly typed network fixes the type; the graph's own is the one used.)"""
    import tensorrt.plugin as trtp

    return [trtp.AutoTuneCombination(pattern.format(T=t), "LINEAR") for t in ("FP32", "FP16", "BF16")]


def aot_result(recipe: KernelRecipe):
    """``(kernel name, PTX, KernelLaunchParams, SymIntExprs)`` for ``trtp.aot_impl``, for this GPU."""
    import tensorrt.plugin as trtp

    compiled = compiled_kernel(recipe)
    params = launch_params(recipe, compiled)
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = params["grid"]
    launch.block_x, launch.block_y, launch.block_z = params["block"]
    launch.shared_mem = params["shared"]
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for value in params["scalars"]])
    return compiled.name, compiled.ptx, launch, extra


def torch_view(tensor):
    """A zero-copy torch view of a ``trtp.Tensor`` on the GPU."""
    import torch

    return torch.as_tensor(tensor, device="cuda")


@contextlib.contextmanager
def on_stream(stream: int):
    """Run torch/Triton work on TensorRT's CUDA stream."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        yield
