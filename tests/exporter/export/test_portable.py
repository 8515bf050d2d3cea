"""The portability checker flags each TensorRT hazard, and every zoo model's graph has none; with TensorRT
for RTX, its parser takes every allowed op and every zoo graph, and its verdicts on the rest are as
documented in ``RTX_PARSER_DIFFERENCES``."""

from __future__ import annotations

import functools

import onnx
import pytest

from exporter.backends.tensorrt_rtx import parse_graph, rtx_available
from exporter.export.export import trace_structure
from exporter.export.portable import ALLOWED_OPS, FORBIDDEN_OPS, MAX_TOPK, RTX_PARSER_DIFFERENCES, check_portable
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


# --- the allow-list against TensorRT for RTX's parser -------------------------------------------------

NO_RTX = rtx_available()
needs_rtx = pytest.mark.skipif(NO_RTX is not None, reason="needs TensorRT for RTX (pip install tensorrt-rtx-cu12)")
F = "float[2, 3, 4]"
UNARY = "Abs Cos Erf Exp Identity Log Neg Reciprocal Relu Sigmoid Sin Sqrt Tanh".split()
# op -> (inputs, body, outputs) of a graph of that op, checked by onnx.checker first
ONE_OP = {
    **{op: (f"{F} x", f"y = {op}(x)", f"{F} y") for op in UNARY},
    **{op: (f"{F} x", f"y = {op}(x, x)", f"{F} y") for op in "Add Div Max Min Mul Pow Sub Sum".split()},
    **{op: (f"{F} x", f"y = {op}(x, x)", "bool[2, 3, 4] y") for op in "Equal Greater GreaterOrEqual Less".split()},
    "LessOrEqual": (f"{F} x", "y = LessOrEqual(x, x)", "bool[2, 3, 4] y"),
    **{op: ("bool[4] x", f"y = {op}(x, x)", "bool[4] y") for op in ("And", "Or", "Xor")},
    **{
        op: (f"{F} x", f"a = Constant<value = int64[1] {{2}}>()\n y = {op}<keepdims = 0>(x, a)", "float[2, 3] y")
        for op in "ReduceMax ReduceMean ReduceMin ReduceSum".split()
    },
    "ArgMax": (f"{F} x", "y = ArgMax<axis = 2>(x)", "int64[2, 3, 1] y"),
    "ArgMin": (f"{F} x", "y = ArgMin<axis = 2>(x)", "int64[2, 3, 1] y"),
    "Cast": (f"{F} x", "y = Cast<to = 10>(x)", "float16[2, 3, 4] y"),
    "Clip": (
        f"{F} x",
        "a = Constant<value = float {0.0}>()\n b = Constant<value = float {1.0}>()\n y = Clip(x, a, b)",
        f"{F} y",
    ),
    "Concat": (f"{F} x", "y = Concat<axis = 0>(x, x)", "float[4, 3, 4] y"),
    "Constant": (f"{F} x", "c = Constant<value = float {2.0}>()\n y = Mul(x, c)", f"{F} y"),
    "ConstantOfShape": (f"{F} x", "s = Shape(x)\n y = ConstantOfShape<value = float[1] {1.0}>(s)", f"{F} y"),
    "Conv": (
        "float[1, 3, 8, 8] x",
        "w = Constant<value = float[2, 3, 2, 2] {"
        + ", ".join(["0.5"] * 24)
        + "}>()\n y = Conv<strides = [2, 2]>(x, w)",
        "float[1, 2, 4, 4] y",
    ),
    "Expand": ("float[3, 1] x", "s = Constant<value = int64[2] {3, 4}>()\n y = Expand(x, s)", "float[3, 4] y"),
    "Flatten": (f"{F} x", "y = Flatten<axis = 1>(x)", "float[2, 12] y"),
    "Gather": (f"{F} x", "i = Constant<value = int64[2] {0, 2}>()\n y = Gather<axis = 1>(x, i)", "float[2, 2, 4] y"),
    "GatherElements": (
        f"{F} x",
        "i = Constant<value = int64[2, 3, 1] {0, 1, 2, 3, 0, 1}>()\n y = GatherElements<axis = 2>(x, i)",
        "float[2, 3, 1] y",
    ),
    "Gemm": (
        "float[2, 4] x",
        "w = Constant<value = float[4, 3] {" + ", ".join(["0.5"] * 12) + "}>()\n y = Gemm(x, w)",
        "float[2, 3] y",
    ),
    "LayerNormalization": (
        f"{F} x",
        "s = Constant<value = float[4] {1, 1, 1, 1}>()\n y = LayerNormalization(x, s)",
        f"{F} y",
    ),
    "MatMul": (
        f"{F} x",
        "w = Constant<value = float[4, 2] {1, 2, 3, 4, 5, 6, 7, 8}>()\n y = MatMul(x, w)",
        "float[2, 3, 2] y",
    ),
    "Not": ("bool[4] x", "y = Not(x)", "bool[4] y"),
    **{
        op: (
            f"{F} x",
            "s = Constant<value = float {0.1}>()\n z = Constant<value = int8 {0}>()\n q = QuantizeLinear(x, s, z)\n"
            " y = DequantizeLinear(q, s, z)",
            f"{F} y",
        )
        for op in ("QuantizeLinear", "DequantizeLinear")
    },
    "Range": (
        "float[4] x",
        "a = Constant<value = int64 {0}>()\n b = Constant<value = int64 {4}>()\n d = Constant<value = int64 {1}>()\n"
        " y = Range(a, b, d)",
        "int64[4] y",
    ),
    "Reshape": (f"{F} x", "s = Constant<value = int64[2] {6, 4}>()\n y = Reshape(x, s)", "float[6, 4] y"),
    "ScatterElements": (
        f"{F} x",
        "i = Constant<value = int64[2, 3, 1] {0, 1, 2, 3, 0, 1}>()\n"
        " u = Constant<value = float[2, 3, 1] {1, 1, 1, 1, 1, 1}>()\n"
        " y = ScatterElements<axis = 2>(x, i, u)",
        f"{F} y",
    ),
    "ScatterND": (
        f"{F} x",
        "i = Constant<value = int64[1, 1] {1}>()\n u = Constant<value = float[1, 3, 4] {"
        + ", ".join(["1"] * 12)
        + "}>()\n"
        " y = ScatterND(x, i, u)",
        f"{F} y",
    ),
    "Shape": (f"{F} x", "y = Shape(x)", "int64[3] y"),
    "Slice": (
        f"{F} x",
        "s = Constant<value = int64[1] {1}>()\n e = Constant<value = int64[1] {3}>()\n"
        " a = Constant<value = int64[1] {2}>()\n"
        " y = Slice(x, s, e, a)",
        "float[2, 3, 2] y",
    ),
    "Softmax": (f"{F} x", "y = Softmax<axis = -1>(x)", f"{F} y"),
    "Split": (
        f"{F} x",
        "s = Constant<value = int64[2] {2, 2}>()\n y, z = Split<axis = 2>(x, s)",
        "float[2, 3, 2] y, float[2, 3, 2] z",
    ),
    "Squeeze": ("float[2, 1, 4] x", "a = Constant<value = int64[1] {1}>()\n y = Squeeze(x, a)", "float[2, 4] y"),
    "Tile": (f"{F} x", "r = Constant<value = int64[3] {1, 2, 1}>()\n y = Tile(x, r)", "float[2, 6, 4] y"),
    "TopK": (
        f"{F} x",
        "k = Constant<value = int64[1] {2}>()\n v, y = TopK(x, k)",
        "float[2, 3, 2] v, int64[2, 3, 2] y",
    ),
    "Transpose": (f"{F} x", "y = Transpose<perm = [0, 2, 1]>(x)", "float[2, 4, 3] y"),
    "Unsqueeze": (f"{F} x", "a = Constant<value = int64[1] {0}>()\n y = Unsqueeze(x, a)", "float[1, 2, 3, 4] y"),
    "Where": (f"{F} x", "c = Greater(x, x)\n y = Where(c, x, x)", f"{F} y"),
}
# the forbidden ops (and TopK beyond MAX_TOPK), each with the parser's verdict in RTX_PARSER_DIFFERENCES
FORBIDDEN_ONE_OP = {
    "NonZero": (f"{F} x", "y = NonZero(x)", "int64[3, N] y"),
    "Unique": ("float[6] x", "y = Unique(x)", "float[N] y"),
    "Compress": ("float[4] x", "c = Constant<value = bool[4] {1, 0, 1, 0}>()\n y = Compress(x, c)", "float[N] y"),
    "CumSum": (f"{F} x", "a = Constant<value = int64 {2}>()\n y = CumSum(x, a)", f"{F} y"),
    "OneHot": (
        "int64[3] x",
        "d = Constant<value = int64 {4}>()\n v = Constant<value = float[2] {0, 1}>()\n y = OneHot(x, d, v)",
        "float[3, 4] y",
    ),
    "Einsum": ("float[2, 3] x", 'y = Einsum<equation = "ij,ij,ij->i">(x, x, x)', "float[2] y"),
    "If": (
        "bool c, float[2] x",
        "y = If<then_branch = g1 () => (float[2] a) { a = Identity(x) }, "
        "else_branch = g2 () => (float[2] b) { b = Neg(x) }>(c)",
        "float[2] y",
    ),
    "Loop": (
        "int64 n, float[2] x",
        "t = Constant<value = bool {1}>()\n"
        " y = Loop<body = g (int64 i, bool cond, float[2] v) => (bool co, float[2] vo) { co = Identity(cond)\n"
        " vo = Add(v, v) }>(n, t, x)",
        "float[2] y",
    ),
    "Scan": (
        "float[3, 2] x",
        "s = Constant<value = float[2] {0, 0}>()\n y, z = Scan<num_scan_inputs = 1, body = g (float[2] st, float[2] xi)"
        " => (float[2] so, float[2] yo) { so = Add(st, xi)\n yo = Identity(so) }>(s, x)",
        "float[2] y, float[3, 2] z",
    ),
    "TopK": (
        "float[2, 5000] x",
        f"k = Constant<value = int64[1] {{{MAX_TOPK + 160}}}>()\n v, y = TopK<axis = 1>(x, k)",
        f"float[2, {MAX_TOPK + 160}] v, int64[2, {MAX_TOPK + 160}] y",
    ),
}


def _one_op(inputs: str, body: str, outputs: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        f'<ir_version: 8, opset_import: ["" : 18]>\ng ({inputs}) => ({outputs}) {{\n {body}\n}}'
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_every_allowed_op_has_its_one_op_graph():
    assert set(ONE_OP) == ALLOWED_OPS and set(FORBIDDEN_ONE_OP) - {"TopK"} == set(FORBIDDEN_OPS)
    assert set(RTX_PARSER_DIFFERENCES) == set(FORBIDDEN_ONE_OP)


@needs_rtx
def test_the_rtx_parser_takes_every_allowed_op():
    refused = {op: parse_graph(_one_op(*graph)).errors for op, graph in sorted(ONE_OP.items())}
    assert not {op: e for op, e in refused.items() if e}


@needs_rtx
@pytest.mark.parametrize("op", sorted(FORBIDDEN_ONE_OP))
def test_the_rtx_parser_on_each_forbidden_op_is_as_documented(op):
    report = parse_graph(_one_op(*FORBIDDEN_ONE_OP[op]))
    assert report.parsed == RTX_PARSER_DIFFERENCES[op].startswith("parses"), (op, report.errors)


@needs_rtx
@pytest.mark.parametrize(
    "name",
    # the released Swin-MoE configs (minutes each to trace, 8 of them) with -m slow; the tiny one every run
    [pytest.param(name, marks=() if name in PORTABLE_CHECKED else pytest.mark.slow) for name in sorted(ZOO)],
)
def test_every_zoo_graph_parses_with_tensorrt_rtx(name):
    report = parse_graph(zoo_graph(name))
    assert report.parsed, report.errors[:3]
    assert report.layers > len(zoo_graph(name).graph.node) // 2


# a V-MoE in FP16 and a Soft-MoE in BF16 in every run; every zoo model in both with -m slow (each
# traced again: 10 to 30 s a model on 2 cores)
FAST = {("vmoe-tiny", "fp16"), ("soft-moe-tiny", "bf16")}


@needs_rtx
@pytest.mark.parametrize(
    "name, precision",
    [
        pytest.param(name, precision, marks=() if (name, precision) in FAST else pytest.mark.slow)
        for name in sorted(ZOO)
        for precision in ("fp16", "bf16")
    ],
)
def test_every_zoo_graph_parses_with_tensorrt_rtx_in_reduced_precision(name, precision):
    graph = trace_structure(ZOO[name], routing_outputs=ZOO[name].family == VMOE, precision=precision)
    report = parse_graph(graph)
    assert report.parsed, report.errors[:3]
