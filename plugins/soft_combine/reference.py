"""``moe::SoftCombine`` in PyTorch: every token a combine-weighted mix of all slot outputs of its image."""

from __future__ import annotations

import torch


def soft_combine(slot_out: torch.Tensor, combine: torch.Tensor, num_experts: int, expert_major: int) -> torch.Tensor:
    """Tokens ``[B, m, D]`` from slot outputs ``[n, B*p, D]`` (expert_major=1) or ``[B, S, D]`` (0)
    and combine weights ``[B, m, S]``.

    Accumulates in float32 and returns the dtype of ``slot_out``.
    """
    slots = slot_out.float()
    if expert_major:
        images, dim = combine.shape[0], slot_out.shape[-1]
        slots = slots.reshape(num_experts, images, -1, dim).transpose(0, 1).reshape(images, -1, dim)
    return torch.matmul(combine.float(), slots).to(slot_out.dtype)
