"""``moe::SoftDispatch`` in PyTorch: every slot a dispatch-weighted mix of the tokens of its image."""

from __future__ import annotations

import torch


def soft_dispatch(x: torch.Tensor, dispatch: torch.Tensor, num_experts: int, expert_major: int) -> torch.Tensor:
    """Slots ``[n, B*p, D]`` (expert_major=1, as the model) or ``[B, S, D]`` (expert_major=0), from
    tokens ``[B, m, D]`` and dispatch weights ``[B, m, S]``.

    Accumulates in float32 and returns the dtype of ``x``.
    """
    slots = torch.matmul(dispatch.float().transpose(1, 2), x.float())  # [B, S, D]
    if expert_major:
        images, _, dim = x.shape
        slots = slots.reshape(images, num_experts, -1, dim).transpose(0, 1).reshape(num_experts, -1, dim)
    return slots.to(x.dtype)
