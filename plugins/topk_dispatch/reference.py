"""``moe::TopKDispatch`` in PyTorch: :class:`exporter.models.vmoe.Dispatch` driven by the slot table."""

from __future__ import annotations

import torch


def topk_dispatch(x: torch.Tensor, slot_token: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert inputs ``[E, G*C, D]``: ``out[e, g*C + c] = x[g, slot_token[g, e*C + c]]``, zeros when empty.

    The same gather as ``Dispatch.forward`` after its ``slot_tokens`` step (which is TopKRoute's
    ``slot_token`` output here).
    """
    num_groups, group_size, dim = x.shape
    capacity = slot_token.shape[1] // num_experts
    per_expert = slot_token.long().reshape(num_groups, num_experts, capacity).transpose(0, 1)  # [E, G, C]
    offset = (torch.arange(num_groups, device=x.device) * group_size).view(1, num_groups, 1)
    rows = (per_expert.clamp(min=0) + offset).reshape(-1)
    gathered = x.reshape(num_groups * group_size, dim).index_select(0, rows)
    filled = (per_expert >= 0).reshape(-1, 1).to(x.dtype)
    return (gathered * filled).reshape(num_experts, num_groups * capacity, dim)
