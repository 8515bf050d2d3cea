"""TensorRT Quickly Deployable Plugin ``moe::SoftRoute`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types.
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.soft_route import kernels, shapes
    from plugins.soft_route.spec import SPEC

    @trtp.register(SPEC.id)
    def soft_route_desc(logits: trtp.TensorDesc) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return qdp.descs(shapes, (logits,))

    @trtp.autotune(SPEC.id)
    def soft_route_autotune(logits: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, FP32", "LINEAR")]

    @trtp.aot_impl(SPEC.id)
    def soft_route_aot(
        logits: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        return qdp.aot_result(kernels.node_recipe((logits.shape_expr,), "float32"))

    @trtp.impl(SPEC.id)
    def soft_route_impl(logits: trtp.Tensor, outputs: tuple[trtp.Tensor], stream: int) -> None:
        with qdp.on_stream(stream):
            kernels.launch(qdp.torch_view(logits), out=tuple(qdp.torch_view(t) for t in outputs))
