"""TensorRT Quickly Deployable Plugin ``moe::TopKRoute`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types.
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.topk_route import kernels
    from plugins.topk_route.spec import SPEC

    @trtp.register(SPEC.id)
    def topk_route_desc(
        gates: trtp.TensorDesc, k: int, capacity: int, batch_priority: int
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        groups, tokens, experts = gates.shape_expr
        per_choice = (groups, tokens, k)
        return (
            trtp.from_shape_expr(per_choice, dtype=trt.int32),
            trtp.from_shape_expr(per_choice, dtype=trt.int32),
            trtp.from_shape_expr(per_choice, dtype=trt.float32),
            trtp.from_shape_expr((groups, experts * capacity), dtype=trt.int32),
        )

    @trtp.autotune(SPEC.id)
    def topk_route_autotune(gates: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, INT32, INT32, FP32, INT32", "LINEAR")]

    @trtp.aot_impl(SPEC.id)
    def topk_route_aot(
        gates: trtp.TensorDesc,
        k: int,
        capacity: int,
        batch_priority: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return qdp.aot_result(kernels.node_recipe((gates.shape_expr,), "float32", k, capacity, batch_priority))

    @trtp.impl(SPEC.id)
    def topk_route_impl(
        gates: trtp.Tensor,
        k: int,
        capacity: int,
        batch_priority: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        with qdp.on_stream(stream):
            outs = tuple(qdp.torch_view(t) for t in outputs)
            kernels.launch(qdp.torch_view(gates), k, capacity, batch_priority, out=outs)
