"""TensorRT Quickly Deployable Plugin ``moe::SoftCombine`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types.
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.soft_combine import kernels, shapes
    from plugins.soft_combine.spec import SPEC

    @trtp.register(SPEC.id)
    def soft_combine_desc(
        slot_out: trtp.TensorDesc, combine: trtp.TensorDesc, num_experts: int, expert_major: int
    ) -> trtp.TensorDesc:
        return qdp.descs(shapes, (slot_out, combine), num_experts=num_experts, expert_major=expert_major)

    @trtp.autotune(SPEC.id)
    def soft_combine_autotune(
        slot_out: trtp.TensorDesc, combine: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return qdp.combinations("{T}, FP32, {T}")

    @trtp.aot_impl(SPEC.id)
    def soft_combine_aot(
        slot_out: trtp.TensorDesc,
        combine: trtp.TensorDesc,
        num_experts: int,
        expert_major: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        shapes = (slot_out.shape_expr, combine.shape_expr)
        dtype = qdp.dtype_name(slot_out.dtype)
        return qdp.aot_result(kernels.node_recipe(shapes, dtype, num_experts, expert_major))

    @trtp.impl(SPEC.id)
    def soft_combine_impl(
        slot_out: trtp.Tensor,
        combine: trtp.Tensor,
        num_experts: int,
        expert_major: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        with qdp.on_stream(stream):
            out = qdp.torch_view(outputs[0])
            kernels.launch(qdp.torch_view(slot_out), qdp.torch_view(combine), num_experts, expert_major, out=out)
