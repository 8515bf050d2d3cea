"""TensorRT Quickly Deployable Plugin ``moe::TopKRoute`` (AOT Triton kernel, JIT fallback).

The only module of this plugin that imports tensorrt, inside :func:`register`. No ``from __future__
import annotations`` here: TensorRT reads the decorated functions' annotations as types, and its
attributes as the parameters after the tensors (all of ``spec.SPEC.attributes``, in order).
"""


def register() -> None:
    """Registers the plugin with TensorRT (call once per process: ``plugins.register.register_all``)."""
    import tensorrt.plugin as trtp

    from plugins import qdp
    from plugins.topk_route import kernels, shapes
    from plugins.topk_route.spec import SPEC

    @trtp.register(SPEC.id)
    def topk_route_desc(
        gates: trtp.TensorDesc,
        k: int,
        capacity: int,
        batch_priority: int,
        by_token: int,
        normalize: int,
        eps: float,
        cap_num: int,
        cap_den: int,
        cap_ceil: int,
        cap_pre: int,
        cap_mul: int,
        cap_align: int,
        cap_min: int,
        cap_clamp: int,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        attrs = dict(
            k=k,
            capacity=capacity,
            batch_priority=batch_priority,
            by_token=by_token,
            normalize=normalize,
            eps=eps,
            cap_num=cap_num,
            cap_den=cap_den,
            cap_ceil=cap_ceil,
            cap_pre=cap_pre,
            cap_mul=cap_mul,
            cap_align=cap_align,
            cap_min=cap_min,
            cap_clamp=cap_clamp,
        )
        return qdp.descs(shapes, (gates,), **attrs)  # the slot table's width may follow the group size

    @trtp.autotune(SPEC.id)
    def topk_route_autotune(gates: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, INT32, INT32, FP32, INT32", "LINEAR")]

    @trtp.aot_impl(SPEC.id)
    def topk_route_aot(
        gates: trtp.TensorDesc,
        k: int,
        capacity: int,
        batch_priority: int,
        by_token: int,
        normalize: int,
        eps: float,
        cap_num: int,
        cap_den: int,
        cap_ceil: int,
        cap_pre: int,
        cap_mul: int,
        cap_align: int,
        cap_min: int,
        cap_clamp: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        attrs = dict(
            by_token=by_token,
            normalize=normalize,
            eps=eps,
            cap_num=cap_num,
            cap_den=cap_den,
            cap_ceil=cap_ceil,
            cap_pre=cap_pre,
            cap_mul=cap_mul,
            cap_align=cap_align,
            cap_min=cap_min,
            cap_clamp=cap_clamp,
        )
        recipe = kernels.node_recipe(
            (gates.shape_expr,), "float32", k, capacity, batch_priority, smax=trtp.max, smin=trtp.min, **attrs
        )
        return qdp.aot_result(recipe)

    @trtp.impl(SPEC.id)
    def topk_route_impl(
        gates: trtp.Tensor,
        k: int,
        capacity: int,
        batch_priority: int,
        by_token: int,
        normalize: int,
        eps: float,
        cap_num: int,
        cap_den: int,
        cap_ceil: int,
        cap_pre: int,
        cap_mul: int,
        cap_align: int,
        cap_min: int,
        cap_clamp: int,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        with qdp.on_stream(stream):
            outs = tuple(qdp.torch_view(t) for t in outputs)
            kernels.launch(
                qdp.torch_view(gates),
                k,
                capacity,
                batch_priority,
                out=outs,
                by_token=by_token,
                normalize=normalize,
                eps=eps,
                cap_num=cap_num,
                cap_den=cap_den,
                cap_ceil=cap_ceil,
                cap_pre=cap_pre,
                cap_mul=cap_mul,
                cap_align=cap_align,
                cap_min=cap_min,
                cap_clamp=cap_clamp,
            )
