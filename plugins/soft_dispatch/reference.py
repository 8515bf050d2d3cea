"""``moe::SoftDispatch`` in PyTorch: :class:`exporter.models.soft_moe.SoftDispatch`."""

from __future__ import annotations

import torch

from exporter.models.soft_moe import SoftDispatch


def soft_dispatch(x: torch.Tensor, dispatch: torch.Tensor, num_experts: int, expert_major: int) -> torch.Tensor:
    """Slots ``[n, B*p, D]`` (expert_major=1, as the model) or ``[B, S, D]`` (expert_major=0).

    Accumulates in float32 and returns the dtype of ``x``.
    """
    if expert_major:
        return SoftDispatch()(x.float(), dispatch.float(), num_experts).to(x.dtype)
    return torch.matmul(dispatch.float().transpose(1, 2), x.float()).to(x.dtype)
