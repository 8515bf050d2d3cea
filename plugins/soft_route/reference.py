"""``moe::SoftRoute`` in PyTorch: the two softmaxes of :class:`exporter.models.soft_moe.SoftRouter`."""

from __future__ import annotations

import torch


def soft_route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dispatch, combine)``, both ``[B, m, S]`` float32: softmax over tokens, softmax over slots."""
    logits = logits.float()
    return torch.softmax(logits, dim=1), torch.softmax(logits, dim=-1)
