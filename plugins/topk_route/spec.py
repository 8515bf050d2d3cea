"""Contract of ``moe::TopKRoute``."""

from plugins.spec import NAMESPACE, AttrSpec, PluginSpec, TensorSpec

SPEC = PluginSpec(
    name="TopKRoute",
    namespace=NAMESPACE,
    role="routing",
    inputs=(TensorSpec("gates", ("float32",), "[G, S, E]", "softmax router probabilities per group, token, expert"),),
    outputs=(
        TensorSpec(
            "expert", ("int32",), "[G, S, K]", "chosen expert per (token, choice), kept or not; ties to the lower index"
        ),
        TensorSpec("slot", ("int32",), "[G, S, K]", "flat slot e*C + c in the group's buffer table, -1 when dropped"),
        TensorSpec(
            "weight", ("float32",), "[G, S, K]", "raw gate of a kept choice (no renormalization), 0 when dropped"
        ),
        TensorSpec("slot_token", ("int32",), "[G, E*C]", "group-local token in each slot, -1 when empty"),
    ),
    attributes=(
        AttrSpec("k", "int", "experts per token, 1 <= k <= E"),
        AttrSpec("capacity", "int", "buffer slots C per expert and group"),
        AttrSpec("batch_priority", "int", "1: Batch Prioritized Routing (descending top-1 gate); 0: token order"),
    ),
    doc="Exactly exporter.models.routing.route_top_k, with slots flattened to e*C + c and the inverse table.",
)
