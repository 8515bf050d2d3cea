"""Contract of ``moe::SoftCombine``."""

from plugins.spec import NAMESPACE, AttrSpec, PluginSpec, TensorSpec

SPEC = PluginSpec(
    name="SoftCombine",
    namespace=NAMESPACE,
    role="combine",
    inputs=(
        TensorSpec(
            "slot_out",
            ("float32", "float16", "bfloat16"),
            "[B, S, D] (expert_major=0) or [n, B*p, D] (expert_major=1)",
            "slot outputs",
        ),
        TensorSpec("combine", ("float32",), "[B, m, S]", "SoftRoute's combine weights"),
    ),
    outputs=(
        TensorSpec(
            "y",
            ("float32", "float16", "bfloat16"),
            "[B, m, D]",
            "y[b, m] = sum_s combine[b, m, s] * slot_out[slot (b, s)]",
        ),
    ),
    attributes=(
        AttrSpec("num_experts", "int", "n; p = S / n slots per expert"),
        AttrSpec("expert_major", "int", "1: slot_out is expert-major [n, B*p, D]; 0: [B, S, D]"),
    ),
    doc="As exporter.models.soft_moe.SoftCombine (expert_major=1), accumulated in float32; dtype of slot_out.",
)
