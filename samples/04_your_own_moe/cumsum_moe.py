"""A top-k MoE layer written by hand in the GShard / Mesh-TensorFlow style: one-hot masks, an exclusive
cumsum over each image's tokens for the buffer positions, dense einsum dispatch and combine, stacked
experts. Each image is a routing group; capacity ``int(k*S*cf/E)``; every first choice before any second."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _parts import DIM, EXPERTS, HIDDEN, vit
from torch import nn


class CumsumMoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, capacity_factor: float):
        super().__init__()
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden) / dim**0.5)
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim))

    def forward(self, x):  # [b, s, d]: each image one group
        b, s, d = x.shape
        probs = self.router(x).softmax(dim=-1)  # [b, s, e]
        capacity = int(self.k * s * self.capacity_factor / self.num_experts)
        combine = x.new_zeros(b, s, self.num_experts, capacity)
        filled = x.new_zeros(b, 1, self.num_experts)
        remaining = probs
        for _ in range(self.k):
            choice = remaining.argmax(dim=-1)
            mask = F.one_hot(choice, self.num_experts).to(x.dtype)
            position = torch.cumsum(mask, dim=1) - 1 + filled
            filled = filled + mask.sum(dim=1, keepdim=True)
            mask = mask * (position < capacity).to(x.dtype)
            gate = (probs * mask).sum(dim=-1)
            slot = F.one_hot((position * mask).sum(dim=-1).long(), capacity).to(x.dtype)
            combine = combine + gate[..., None, None] * mask[..., None] * slot[..., None, :]
            remaining = remaining.masked_fill(F.one_hot(choice, self.num_experts).bool(), float("-inf"))
        dispatch = (combine > 0).to(x.dtype)
        expert_in = torch.einsum("bsec,bsd->ebcd", dispatch, x).reshape(self.num_experts, -1, d)
        hidden = F.gelu(torch.bmm(expert_in, self.w1) + self.b1)
        expert_out = (torch.bmm(hidden, self.w2) + self.b2).reshape(self.num_experts, b, capacity, d)
        return torch.einsum("bsec,ebcd->bsd", combine, expert_out)


def _build(k: int):
    torch.manual_seed(0)
    return vit(lambda i: CumsumMoE(DIM, HIDDEN, EXPERTS, k=k, capacity_factor=0.75))


def top1():
    return _build(1)


def top2():
    return _build(2)
