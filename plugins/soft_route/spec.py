"""Contract of ``moe::SoftRoute``."""

from plugins.spec import NAMESPACE, PluginSpec, TensorSpec

SPEC = PluginSpec(
    name="SoftRoute",
    namespace=NAMESPACE,
    role="routing",
    inputs=(TensorSpec("logits", ("float32",), "[B, m, S]", "router logits per image, token, slot (S = n*p)"),),
    outputs=(
        TensorSpec("dispatch", ("float32",), "[B, m, S]", "softmax over the m tokens (axis 1)"),
        TensorSpec("combine", ("float32",), "[B, m, S]", "softmax over the S slots (axis 2)"),
    ),
    doc="As exporter.models.soft_moe.SoftRouter after the logits.",
)
