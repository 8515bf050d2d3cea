"""``moe::TopKRoute`` in PyTorch: :func:`exporter.routing.route_top_k` in the plugin's layout."""

from __future__ import annotations

import torch

from exporter.models.vmoe import slot_tokens
from exporter.routing import route_top_k


def topk_route(
    gates: torch.Tensor, k: int, capacity: int, batch_priority: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert, slot, weight, slot_token)`` for gates ``[G, S, E]``; int32 indices, float32 weight."""
    num_experts = gates.shape[-1]
    routing = route_top_k(gates, k, capacity, bool(batch_priority))
    flat = torch.where(routing.slot >= 0, routing.expert * capacity + routing.slot, -1)
    table = slot_tokens(routing, num_experts, capacity)
    return (
        routing.expert.to(torch.int32),
        flat.to(torch.int32),
        routing.weight.float(),
        table.to(torch.int32),
    )
