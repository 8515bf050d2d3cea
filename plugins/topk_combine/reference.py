"""``moe::TopKCombine`` in PyTorch: :class:`exporter.models.vmoe.Combine` on the plugin's flat slots."""

from __future__ import annotations

import torch

from exporter.models.vmoe import Combine
from exporter.routing import TopKRouting


def topk_combine(expert_out: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor, capacity: int) -> torch.Tensor:
    """Tokens ``[G, S, D]``: per token, the weighted sum of its kept choices' expert outputs.

    Accumulates in float32 (the plugin's contract) and returns the dtype of ``expert_out``.
    """
    slot = slot.long()
    kept = slot >= 0
    routing = TopKRouting(
        expert=torch.where(kept, slot // capacity, 0),
        slot=torch.where(kept, slot % capacity, -1),
        weight=torch.where(kept, weight.float(), 0.0),
    )
    return Combine()(expert_out.float(), routing, capacity).to(expert_out.dtype)
