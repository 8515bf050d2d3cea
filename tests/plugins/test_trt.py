"""Each plugin inside a TensorRT engine (AOT PTX and JIT), against its reference (GPU + TensorRT)."""

from __future__ import annotations

import pytest
import torch

from plugins import registry
from plugins.soft_combine.reference import soft_combine
from plugins.soft_dispatch.reference import soft_dispatch
from plugins.soft_route.reference import soft_route
from plugins.topk_combine.reference import topk_combine
from plugins.topk_dispatch.reference import topk_dispatch
from plugins.topk_route.reference import topk_route

pytestmark = pytest.mark.gpu

TORCH_TO_TRT = {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32"}


def run_plugin(name: str, inputs: list[torch.Tensor], attrs: dict, aot: bool) -> list[torch.Tensor]:
    """Builds a one-plugin engine with static shapes and runs it on ``inputs`` (CUDA tensors)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from plugins.register import register_all

    register_all()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    spec = registry.spec(name)
    tensors = [
        network.add_input(t.name, getattr(trt, TORCH_TO_TRT[x.dtype]), tuple(x.shape))
        for t, x in zip(spec.inputs, inputs)
    ]
    layer = network.add_plugin(getattr(trtp.op.moe, name)(*tensors, **attrs), aot=aot)
    for i, out in enumerate(spec.outputs):
        layer.get_output(i).name = out.name
        network.mark_output(layer.get_output(i))
    engine_bytes = builder.build_serialized_network(network, builder.create_builder_config())
    assert engine_bytes is not None, f"building {name} failed"
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    for t, x in zip(spec.inputs, inputs):
        context.set_tensor_address(t.name, x.data_ptr())
    outputs = []
    for out in spec.outputs:
        dtype = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32}[
            engine.get_tensor_dtype(out.name).name
        ]
        tensor = torch.empty(tuple(context.get_tensor_shape(out.name)), dtype=dtype, device="cuda")
        context.set_tensor_address(out.name, tensor.data_ptr())
        outputs.append(tensor)
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return [t.cpu() for t in outputs]


@pytest.mark.parametrize("aot", [True, False])
def test_vmoe_plugins(aot):
    gates = torch.softmax(torch.randn(2, 394, 8), dim=-1)
    k, capacity = 2, 104
    got = run_plugin("TopKRoute", [gates.cuda()], {"k": k, "capacity": capacity, "batch_priority": 1}, aot)
    want = topk_route(gates, k, capacity, 1)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    _, slot, weight, table = want
    x = torch.randn(2, 394, 64, dtype=torch.float16)
    (expert_in,) = run_plugin("TopKDispatch", [x.cuda(), table.cuda()], {"num_experts": 8}, aot)
    assert torch.equal(expert_in, topk_dispatch(x, table, 8))
    (y,) = run_plugin("TopKCombine", [expert_in.cuda(), slot.cuda(), weight.cuda()], {}, aot)
    torch.testing.assert_close(y, topk_combine(expert_in, slot, weight), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("aot", [True, False])
def test_soft_moe_plugins(aot):
    logits = torch.randn(2, 196, 16) * 3
    dispatch, combine = run_plugin("SoftRoute", [logits.cuda()], {}, aot)
    want_dispatch, want_combine = soft_route(logits)
    torch.testing.assert_close(dispatch, want_dispatch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combine, want_combine, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 196, 64)
    attrs = {"num_experts": 8, "expert_major": 1}
    (slots,) = run_plugin("SoftDispatch", [x.cuda(), want_dispatch.cuda()], attrs, aot)
    torch.testing.assert_close(slots, soft_dispatch(x, want_dispatch, 8, 1), rtol=1e-4, atol=1e-4)
    (y,) = run_plugin("SoftCombine", [slots.cuda(), want_combine.cuda()], attrs, aot)
    torch.testing.assert_close(y, soft_combine(slots, want_combine, 8, 1), rtol=1e-4, atol=1e-4)
