"""Contract of ``moe::TopKCombine``."""

from plugins.spec import NAMESPACE, PluginSpec, TensorSpec

SPEC = PluginSpec(
    name="TopKCombine",
    namespace=NAMESPACE,
    role="combine",
    inputs=(
        TensorSpec("expert_out", ("float32", "float16", "bfloat16"), "[E, G*C, D]", "expert outputs per buffer slot"),
        TensorSpec("slot", ("int32",), "[G, S, K]", "TopKRoute's flat slots e*C + c, -1 when dropped"),
        TensorSpec("weight", ("float32",), "[G, S, K]", "TopKRoute's weights, 0 when dropped"),
    ),
    outputs=(
        TensorSpec(
            "y",
            ("float32", "float16", "bfloat16"),
            "[G, S, D]",
            "sum over kept choices of weight * expert_out[e, g*C + c]",
        ),
    ),
    doc="As exporter.models.vmoe.Combine, accumulated in float32; dtype of expert_out; deterministic. "
    "C, the slots per expert and group, is expert_out's rows over G (it may follow the batch).",
)
