"""The portability checker flags each TensorRT hazard, and every zoo model's graph has none."""

from __future__ import annotations

import functools

import onnx
import pytest

from exporter.export.export import trace_structure
from exporter.export.portable import ALLOWED_OPS, FORBIDDEN_OPS, check_portable
from exporter.models.routing import compute_capacity
from exporter.sources.zoo import SWIN_MOE, VMOE, ZOO


def _model(body: str, inputs: str = "float[N, 4] x", outputs: str = "float[M] y") -> onnx.ModelProto:
    return onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 18]>
        g ({inputs}) => ({outputs}) {{ {body} }}"""
    )


@pytest.mark.parametrize(
    "body, outputs, reason",
    [
        ("y = NonZero(x)", "int64[2, M] y", "data-dependent"),
        ("a = Constant<value = int64 {1}>()\n y = CumSum(x, a)", "float[N, 4] y", "CumSum"),
        ('y = Einsum<equation = "ij,ij,ij->i">(x, x, x)', "float[N] y", "Einsum"),
        ("k = Shape(x)\n v, y = TopK(x, k)", "int64[N, 4] y", "k is not a constant"),
        ("k = Constant<value = int64[1] {4000}>()\n v, y = TopK(x, k)", "int64[N, 4] y", "k=4000"),
        ("y = Det(x)", "float[N] y", "not on the allow-list"),
    ],
)
def test_hazards_are_reported(body, outputs, reason):
    findings = check_portable(_model(body, outputs=outputs))
    assert len(findings) == 1 and reason in findings[0]


def test_scatter_with_reduction_is_reported_and_without_is_not():
    def scatter(reduction):
        return _model(
            f'i = Constant<value = int64[1, 1] {{0}}>()\n y = ScatterElements<reduction = "{reduction}">(x, i, x)',
            outputs="float[N, 4] y",
        )

    assert check_portable(scatter("none")) == []
    assert "reduction" in check_portable(scatter("add"))[0]


def test_a_constant_small_topk_is_portable():
    model = _model("k = Constant<value = int64[1] {2}>()\n v, y = TopK(x, k)", outputs="int64[N, 2] y")
    assert check_portable(model) == []


def test_custom_domains_are_reported():
    model = _model("y = Foo(x)", outputs="float[N, 4] y")
    model.graph.node[0].domain = "moe"
    model.opset_import.append(onnx.helper.make_opsetid("moe", 1))
    assert "custom domain" in check_portable(model)[0]


def test_allow_and_forbid_lists_do_not_overlap():
    assert not ALLOWED_OPS & set(FORBIDDEN_OPS)


@functools.cache
def zoo_graph(name: str) -> onnx.ModelProto:
    return trace_structure(ZOO[name], routing_outputs=ZOO[name].family in (VMOE, SWIN_MOE))


# The released Swin-MoE configs take minutes each to trace (24 blocks): their graphs are checked by
# benchmarks/swin_moe.py; the tiny one, the same code at another size, is checked here.
PORTABLE_CHECKED = sorted(n for n, c in ZOO.items() if c.family != SWIN_MOE or "tiny" in c.tags)


@pytest.mark.parametrize("name", PORTABLE_CHECKED)
def test_every_zoo_graph_is_portable(name):
    graph = zoo_graph(name)
    ops = {n.op_type for n in graph.graph.node}
    assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS
    assert check_portable(graph) == []
    if ZOO[name].family in (VMOE, SWIN_MOE):
        assert {"ArgMax", "ScatterElements", "Gather"} <= ops  # routing, dispatch and combine are in the graph
        assert "TopK" not in ops and "CumSum" not in ops


def _largest_per_unit(graph: onnx.ModelProto) -> tuple[int, str]:
    """Largest static element count of any value, counting symbolic (batch/group) axes as 1."""
    inferred = onnx.shape_inference.infer_shapes(graph)
    best = (0, "")
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        size = 1
        for d in dims:
            size *= d.dim_value if d.HasField("dim_value") else 1
        best = max(best, (size, v.name))
    return best


@pytest.mark.parametrize("name", sorted(n for n in ZOO if ZOO[n].family == VMOE))
def test_no_tokens_x_experts_x_capacity_x_width_tensor(name):
    config = ZOO[name]
    group = config.group_images * config.tokens
    cap = compute_capacity(group * config.k, config.num_experts, config.capacity_factor)
    forbidden = group * config.num_experts * cap * config.dim
    largest, value = _largest_per_unit(zoo_graph(name))
    # the biggest tensors are the experts' hidden activations and the [S, S] priority order
    bound = 2 * max(config.num_experts * cap * config.mlp_dim, group * group, group * config.heads * config.tokens)
    assert largest <= bound < forbidden, (value, largest)
