"""Contract of ``moe::TopKDispatch``."""

from plugins.spec import NAMESPACE, AttrSpec, PluginSpec, TensorSpec

SPEC = PluginSpec(
    name="TopKDispatch",
    namespace=NAMESPACE,
    role="dispatch",
    inputs=(
        TensorSpec("x", ("float32", "float16", "bfloat16"), "[G, S, D]", "tokens per routing group"),
        TensorSpec("slot_token", ("int32",), "[G, E*C]", "TopKRoute's slot table, -1 for an empty slot"),
    ),
    outputs=(
        TensorSpec(
            "expert_in",
            ("float32", "float16", "bfloat16"),
            "[E, G*C, D]",
            "out[e, g*C + c] = x[g, slot_token[g, e*C + c]], 0 if empty",
        ),
    ),
    attributes=(AttrSpec("num_experts", "int", "E"),),
    doc="As exporter.models.vmoe.Dispatch; dtype of x.",
)
