"""TensorRT Quickly Deployable Plugin ``moe::TopKCombine`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types.
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.topk_combine import kernels, shapes
    from plugins.topk_combine.spec import SPEC

    @trtp.register(SPEC.id)
    def topk_combine_desc(
        expert_out: trtp.TensorDesc, slot: trtp.TensorDesc, weight: trtp.TensorDesc
    ) -> trtp.TensorDesc:
        return qdp.descs(shapes, (expert_out, slot, weight))

    @trtp.autotune(SPEC.id)
    def topk_combine_autotune(
        expert_out: trtp.TensorDesc, slot: trtp.TensorDesc, weight: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return qdp.combinations("{T}, INT32, FP32, {T}")

    @trtp.aot_impl(SPEC.id)
    def topk_combine_aot(
        expert_out: trtp.TensorDesc,
        slot: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        shapes = (expert_out.shape_expr, slot.shape_expr, weight.shape_expr)
        return qdp.aot_result(kernels.node_recipe(shapes, qdp.dtype_name(expert_out.dtype)))

    @trtp.impl(SPEC.id)
    def topk_combine_impl(
        expert_out: trtp.Tensor,
        slot: trtp.Tensor,
        weight: trtp.Tensor,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        with qdp.on_stream(stream):
            views = [qdp.torch_view(t) for t in (expert_out, slot, weight)]
            kernels.launch(*views, out=qdp.torch_view(outputs[0]))
