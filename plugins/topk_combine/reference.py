"""``moe::TopKCombine`` in PyTorch: per token, the gate-weighted sum of its kept choices' expert outputs."""

from __future__ import annotations

import torch


def topk_combine(expert_out: torch.Tensor, slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Tokens ``[G, S, D]`` from expert outputs ``[E, G*C, D]`` and the flat slots ``e*C + c`` of each
    (token, choice) (``-1`` when dropped); C is the rows per group of ``expert_out``.

    Accumulates in float32 (the plugin's contract) and returns the dtype of ``expert_out``.
    """
    experts, rows, dim = expert_out.shape
    groups, tokens, k = slot.shape
    capacity = rows // groups
    slot = slot.long()
    kept = slot >= 0
    expert, position = slot.clamp(min=0) // capacity, slot.clamp(min=0) % capacity
    row = expert * rows + torch.arange(groups).view(groups, 1, 1) * capacity + position  # rows == G*C
    picked = expert_out.float().reshape(experts * rows, dim)[row.reshape(-1)].reshape(groups, tokens, k, dim)
    gate = torch.where(kept, weight.float(), 0.0).unsqueeze(-1)
    return (picked * gate).sum(dim=2).to(expert_out.dtype)
