"""Contract of ``moe::SoftDispatch``."""

from plugins.spec import NAMESPACE, AttrSpec, PluginSpec, TensorSpec

SPEC = PluginSpec(
    name="SoftDispatch",
    namespace=NAMESPACE,
    role="dispatch",
    inputs=(
        TensorSpec("x", ("float32", "float16", "bfloat16"), "[B, m, D]", "tokens per image"),
        TensorSpec("dispatch", ("float32",), "[B, m, S]", "SoftRoute's dispatch weights"),
    ),
    outputs=(
        TensorSpec(
            "slots",
            ("float32", "float16", "bfloat16"),
            "[B, S, D] (expert_major=0) or [n, B*p, D] (expert_major=1)",
            "slots[b, s] = sum_m dispatch[b, m, s] * x[b, m]; slot s = e*p + q of image b is row b*p + q of expert e",
        ),
    ),
    attributes=(
        AttrSpec("num_experts", "int", "n; p = S / n slots per expert"),
        AttrSpec("expert_major", "int", "1: expert-major output [n, B*p, D]; 0: [B, S, D]"),
    ),
    doc="As exporter.models.soft_moe.SoftDispatch (expert_major=1), accumulated in float32; dtype of x.",
)
