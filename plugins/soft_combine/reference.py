"""``moe::SoftCombine`` in PyTorch: :class:`exporter.models.soft_moe.SoftCombine`."""

from __future__ import annotations

import torch

from exporter.models.soft_moe import SoftCombine


def soft_combine(slot_out: torch.Tensor, combine: torch.Tensor, num_experts: int, expert_major: int) -> torch.Tensor:
    """Tokens ``[B, m, D]`` from slot outputs ``[n, B*p, D]`` (expert_major=1) or ``[B, S, D]`` (0).

    Accumulates in float32 and returns the dtype of ``slot_out``.
    """
    if expert_major:
        return SoftCombine()(slot_out.float(), combine.float()).to(slot_out.dtype)
    return torch.matmul(combine.float(), slot_out.float()).to(slot_out.dtype)
