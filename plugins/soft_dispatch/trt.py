"""TensorRT Quickly Deployable Plugin ``moe::SoftDispatch`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types.
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.soft_dispatch import kernels, shapes
    from plugins.soft_dispatch.spec import SPEC

    @trtp.register(SPEC.id)
    def soft_dispatch_desc(
        x: trtp.TensorDesc, dispatch: trtp.TensorDesc, num_experts: int, expert_major: int
    ) -> trtp.TensorDesc:
        return qdp.descs(shapes, (x, dispatch), num_experts=num_experts, expert_major=expert_major)

    @trtp.autotune(SPEC.id)
    def soft_dispatch_autotune(
        x: trtp.TensorDesc, dispatch: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return qdp.combinations("{T}, FP32, {T}")

    @trtp.aot_impl(SPEC.id)
    def soft_dispatch_aot(
        x: trtp.TensorDesc,
        dispatch: trtp.TensorDesc,
        num_experts: int,
        expert_major: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        shapes = (x.shape_expr, dispatch.shape_expr)
        return qdp.aot_result(kernels.node_recipe(shapes, qdp.dtype_name(x.dtype), num_experts, expert_major))

    @trtp.impl(SPEC.id)
    def soft_dispatch_impl(
        x: trtp.Tensor,
        dispatch: trtp.Tensor,
        num_experts: int,
        expert_major: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        with qdp.on_stream(stream):
            out = qdp.torch_view(outputs[0])
            kernels.launch(qdp.torch_view(x), qdp.torch_view(dispatch), num_experts, expert_major, out=out)
