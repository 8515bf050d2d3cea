"""``moe::SoftRoute``: Soft-MoE dispatch and combine weights from the router logits."""
