"""TensorRT Quickly Deployable Plugin ``moe::TopKDispatch`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types.
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.topk_dispatch import kernels, shapes
    from plugins.topk_dispatch.spec import SPEC

    @trtp.register(SPEC.id)
    def topk_dispatch_desc(x: trtp.TensorDesc, slot_token: trtp.TensorDesc, num_experts: int) -> trtp.TensorDesc:
        return qdp.descs(shapes, (x, slot_token), num_experts=num_experts)

    @trtp.autotune(SPEC.id)
    def topk_dispatch_autotune(
        x: trtp.TensorDesc, slot_token: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return qdp.combinations("{T}, INT32, {T}")

    @trtp.aot_impl(SPEC.id)
    def topk_dispatch_aot(
        x: trtp.TensorDesc, slot_token: trtp.TensorDesc, num_experts: int, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        shapes = (x.shape_expr, slot_token.shape_expr)
        return qdp.aot_result(kernels.node_recipe(shapes, qdp.dtype_name(x.dtype), num_experts))

    @trtp.impl(SPEC.id)
    def topk_dispatch_impl(
        x: trtp.Tensor, slot_token: trtp.Tensor, num_experts: int, outputs: tuple[trtp.Tensor], stream: int
    ) -> None:
        with qdp.on_stream(stream):
            kernels.launch(qdp.torch_view(x), qdp.torch_view(slot_token), num_experts, out=qdp.torch_view(outputs[0]))
