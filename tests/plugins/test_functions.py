"""The ONNX local function of every plugin, run by ONNX Runtime, against the PyTorch semantics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from exporter.models.routing import route_top_k
from exporter.models.vmoe import Combine, Dispatch, slot_tokens
from plugins.onnx_function import DOMAIN, OPSET, PARSER_ATTRIBUTES
from plugins.soft_combine.function import function as soft_combine
from plugins.soft_dispatch.function import function as soft_dispatch
from plugins.soft_route.function import function as soft_route
from plugins.topk_combine.function import function as topk_combine
from plugins.topk_dispatch.function import function as topk_dispatch
from plugins.topk_route.function import function as topk_route

ROUTE_TYPES = [(np.int32, 3), (np.int32, 3), (np.float32, 3), (np.int32, 2)]
_DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int32: TensorProto.INT32}


def run_function(function: onnx.FunctionProto, inputs: dict[str, np.ndarray], out_types: list[tuple], **attrs) -> list:
    """One plugin node plus its local function, as a model; the node carries the parser attributes."""
    outs = [f"out{i}" for i in range(len(out_types))]
    node = helper.make_node(function.name, list(inputs), outs, domain=DOMAIN, **attrs, **PARSER_ATTRIBUTES)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(k, _DTYPES[v.dtype.type], v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, _DTYPES[t], [None] * r) for o, (t, r) in zip(outs, out_types)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)], functions=[function]
    )
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def tied_gates(rng, groups, tokens, experts, distinct):
    """Router probabilities with exact ties: tokens repeat a few distinct rows, some rows tie experts."""
    rows = rng.random((distinct, experts)).astype(np.float32)
    rows[0, :] = rows[0, 0]  # every expert ties
    logits = rows[rng.integers(0, distinct, size=(groups, tokens))]
    gates = torch.softmax(torch.from_numpy(logits), dim=-1)
    return gates


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 3),
    tokens=st.integers(1, 40),
    experts=st.integers(1, 6),
    k=st.integers(1, 2),
    capacity=st.integers(1, 12),
    bpr=st.booleans(),
)
def test_topk_route_function_matches_route_top_k(seed, groups, tokens, experts, k, capacity, bpr):
    k = min(k, experts)
    rng = np.random.default_rng(seed)
    gates = tied_gates(rng, groups, tokens, experts, distinct=max(1, tokens // 3))
    expert, slot, weight, table = run_function(
        topk_route(), {"gates": gates.numpy()}, ROUTE_TYPES, k=k, capacity=capacity, batch_priority=int(bpr)
    )
    ref = route_top_k(gates, k, capacity, bpr)
    assert expert.dtype == np.int32 and slot.dtype == np.int32 and table.dtype == np.int32
    np.testing.assert_array_equal(expert, ref.expert.numpy())
    flat = torch.where(ref.slot >= 0, ref.expert * capacity + ref.slot, -1)
    np.testing.assert_array_equal(slot, flat.numpy())
    np.testing.assert_array_equal(weight, ref.weight.numpy())
    np.testing.assert_array_equal(table, slot_tokens(ref, experts, capacity).numpy())


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 40),
    experts=st.integers(2, 6),
    k=st.integers(1, 3),
    capacity=st.integers(1, 12),
    bpr=st.booleans(),
    by_token=st.booleans(),
    normalize=st.integers(0, 3),
)
def test_topk_route_function_other_authors_semantics(seed, tokens, experts, k, capacity, bpr, by_token, normalize):
    """A token's choices together and renormalised weights: the same decisions as route_top_k, weights
    within float32 rounding (ReduceSum may add the k gates in another order than the kernel)."""
    k = min(k, experts)
    gates = tied_gates(np.random.default_rng(seed), 2, tokens, experts, distinct=max(1, tokens // 3))
    attrs = dict(by_token=int(by_token), normalize=normalize, eps=1e-7)
    expert, slot, weight, table = run_function(
        topk_route(), {"gates": gates.numpy()}, ROUTE_TYPES, k=k, capacity=capacity, batch_priority=int(bpr), **attrs
    )
    ref = route_top_k(gates, k, capacity, bpr, **attrs)
    np.testing.assert_array_equal(expert, ref.expert.numpy())
    np.testing.assert_array_equal(slot, torch.where(ref.slot >= 0, ref.expert * capacity + ref.slot, -1).numpy())
    np.testing.assert_allclose(weight, ref.weight.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(table, slot_tokens(ref, experts, capacity).numpy())


@pytest.mark.parametrize(
    "rule",
    [
        dict(cap_num=5, cap_den=16, cap_ceil=0, cap_clamp=1, cap_min=4),
        dict(cap_num=1, cap_den=4, cap_ceil=1, cap_min=8),
        dict(cap_num=5, cap_den=4, cap_ceil=0, cap_pre=4, cap_mul=2, cap_align=8),
        dict(cap_num=9, cap_den=8, cap_ceil=1, cap_align=4),
    ],
)
@pytest.mark.parametrize("tokens", [1, 7, 40, 131])
def test_topk_route_function_capacity_rule(rule, tokens):
    """capacity 0: the slot table's width follows the group size by plugins.topk_route.capacity."""
    from plugins.topk_route.capacity import capacity as capacity_of

    gates = tied_gates(np.random.default_rng(tokens), 1, tokens, 4, distinct=tokens)
    *_, table = run_function(topk_route(), {"gates": gates.numpy()}, ROUTE_TYPES, k=2, capacity=0, **rule)
    expected = capacity_of(tokens, rule)
    assert table.shape == (1, 4 * expected)
    np.testing.assert_array_equal(table, slot_tokens(route_top_k(gates, 2, expected, False), 4, expected).numpy())


def test_topk_route_function_drops_and_prioritizes():
    """A hand-checked case: 4 tokens, 2 experts, capacity 1, k=1. Vanilla keeps the first token per
    expert, BPR the most confident one."""
    gates = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]])
    for bpr, kept_tokens in ((0, {0, 2}), (1, {1, 3})):
        _, slot, _, table = run_function(
            topk_route(), {"gates": gates.numpy()}, ROUTE_TYPES, k=1, capacity=1, batch_priority=bpr
        )
        assert {t for t in range(4) if slot[0, t, 0] >= 0} == kept_tokens
        assert set(table[0].tolist()) == kept_tokens


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_topk_dispatch_and_combine_functions_match_the_model(dtype):
    rng = np.random.default_rng(1)
    groups, tokens, experts, k, capacity, dim = 2, 24, 4, 2, 8, 16
    gates = tied_gates(rng, groups, tokens, experts, distinct=10)
    routing = route_top_k(gates, k, capacity, True)
    x = torch.from_numpy(rng.standard_normal((groups, tokens, dim)).astype(dtype))
    table = slot_tokens(routing, experts, capacity).to(torch.int32).numpy()
    (expert_in,) = run_function(
        topk_dispatch(), {"x": x.numpy(), "slot_token": table}, [(dtype, 3)], num_experts=experts
    )
    ref_in = Dispatch()(x.float(), routing, experts, capacity).numpy()
    assert expert_in.dtype == dtype and (ref_in == 0).all(axis=-1).any()  # some slots are empty
    np.testing.assert_array_equal(expert_in, ref_in.astype(dtype))

    expert_out = rng.standard_normal(expert_in.shape).astype(dtype)
    flat = torch.where(routing.slot >= 0, routing.expert * capacity + routing.slot, -1).to(torch.int32).numpy()
    (y,) = run_function(
        topk_combine(),
        {"expert_out": expert_out, "slot": flat, "weight": routing.weight.numpy()},
        [(dtype, 3)],
    )
    ref_y = Combine()(torch.from_numpy(expert_out).float(), routing, capacity).numpy()
    # accumulated in float32 and rounded once to the tokens' type, as the kernel: within one rounding
    tol = 1e-6 if dtype == np.float32 else 2.0**-11
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float32), ref_y.astype(dtype).astype(np.float32), rtol=tol, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("expert_major", [0, 1])
def test_soft_functions_match_the_reference(expert_major, dtype):
    """FP32 router weights with FP32 or FP16 tokens (the reduced-precision graphs): the mixes are
    accumulated in float32 and rounded once to the tokens' type, as the kernels."""
    rng = np.random.default_rng(2)
    images, tokens, experts, per_expert, dim = 3, 10, 4, 2, 8
    slots = experts * per_expert
    logits = rng.standard_normal((images, tokens, slots)).astype(np.float32)
    dispatch, combine = run_function(soft_route(), {"logits": logits}, [(np.float32, 3)] * 2)
    t = torch.from_numpy(logits)
    np.testing.assert_allclose(dispatch, torch.softmax(t, 1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(combine, torch.softmax(t, 2).numpy(), rtol=1e-6)

    x = rng.standard_normal((images, tokens, dim)).astype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 2.0**-11
    (out,) = run_function(
        soft_dispatch(),
        {"x": x, "dispatch": dispatch},
        [(dtype, 3)],
        num_experts=experts,
        expert_major=expert_major,
    )
    canonical = np.einsum("bms,bmd->bsd", dispatch.astype(np.float64), x.astype(np.float64))
    mixed = canonical
    if expert_major:
        mixed = mixed.reshape(images, experts, per_expert, dim).transpose(1, 0, 2, 3).reshape(experts, -1, dim)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(np.float64), mixed.astype(dtype), rtol=rtol, atol=1e-6)

    (y,) = run_function(
        soft_combine(),
        {"slot_out": out, "combine": combine},
        [(dtype, 3)],
        num_experts=experts,
        expert_major=expert_major,
    )
    slot_values = canonical.astype(dtype).astype(np.float64)  # the combine reads the rounded slots
    expected = np.einsum("bms,bsd->bmd", combine.astype(np.float64), slot_values)
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float64), expected.astype(dtype), rtol=rtol, atol=1e-6)
