"""Contract of ``moe::TopKRoute``."""

from plugins.spec import NAMESPACE, AttrSpec, PluginSpec, TensorSpec
from plugins.topk_route.capacity import RULE_DEFAULTS

#: How ``weight`` is computed from the chosen gates (attribute ``normalize``).
NORMALIZE = {
    0: "the raw gate (vmoe, tutel, DeepSpeed top-1)",
    1: "gate / (sum of the k chosen gates + eps), before capacity (GShard, lucidrains)",
    2: "gate / max(sum of the k chosen gates, eps), before capacity (st-moe)",
    3: "gate / max(sum of the kept gates, eps), after capacity (DeepSpeed top-2 and top-k)",
}

#: The attributes' defaults: vmoe's semantics (passes in order, raw gates) and the capacity rule's identity.
DEFAULTS = {"by_token": 0, "normalize": 0, "eps": 0.0, **RULE_DEFAULTS}

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
            "weight", ("float32",), "[G, S, K]", "combine weight of a kept choice (see normalize), 0 when dropped"
        ),
        TensorSpec("slot_token", ("int32",), "[G, E*C]", "group-local token in each slot, -1 when empty"),
    ),
    attributes=(
        AttrSpec("k", "int", "experts per token, 1 <= k <= E"),
        AttrSpec("capacity", "int", "buffer slots C per expert and group; 0: C from the cap_* rule of S"),
        AttrSpec("batch_priority", "int", "1: Batch Prioritized Routing (descending top-1 gate); 0: token order"),
        AttrSpec(
            "by_token",
            "int",
            "0: every first choice takes a slot before any second choice; 1: a token's choices together, "
            "in token order",
            DEFAULTS["by_token"],
        ),
        AttrSpec(
            "normalize",
            "int",
            "combine weights: " + "; ".join(f"{k}: {v}" for k, v in NORMALIZE.items()),
            DEFAULTS["normalize"],
        ),
        AttrSpec("eps", "float", "the epsilon of normalize 1 to 3", DEFAULTS["eps"]),
        AttrSpec("cap_num", "int", "capacity rule: numerator of the capacity factor's fraction", DEFAULTS["cap_num"]),
        AttrSpec("cap_den", "int", "capacity rule: denominator of the capacity factor's fraction", DEFAULTS["cap_den"]),
        AttrSpec("cap_ceil", "int", "capacity rule: 1 rounds the fraction up, 0 down", DEFAULTS["cap_ceil"]),
        AttrSpec("cap_pre", "int", "capacity rule: S is first divided by this, rounded up", DEFAULTS["cap_pre"]),
        AttrSpec("cap_mul", "int", "capacity rule: multiplier after rounding", DEFAULTS["cap_mul"]),
        AttrSpec("cap_align", "int", "capacity rule: rounded up to a multiple of this", DEFAULTS["cap_align"]),
        AttrSpec("cap_min", "int", "capacity rule: at least this many slots", DEFAULTS["cap_min"]),
        AttrSpec("cap_clamp", "int", "capacity rule: 1 caps the capacity at S", DEFAULTS["cap_clamp"]),
    ),
    doc="Exactly exporter.models.routing.route_top_k, with slots flattened to e*C + c and the inverse table; "
    "the capacity rule is plugins.topk_route.capacity.",
)
