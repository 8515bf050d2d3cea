"""A top-k MoE layer written by hand as many ports write it: a Python loop over the experts, boolean masks,
``nonzero``, the first tokens up to the capacity, ``index_add_``. The whole batch is one routing group
(capacity ``int(cf*T*k/E)`` follows the batch), and a token's choices take their places together, in
token order (``nonzero`` of a ``[T, k]`` mask).

torch.export traces this only strictly (TorchDynamo keeps ``int()`` of the batch symbolic; a non-strict
trace fixes it to the traced batch): moe-export tries that for you."""

from __future__ import annotations

import torch
from _parts import DIM, EXPERTS, HIDDEN, vit
from torch import nn


class LoopMoE(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, capacity_factor: float):
        super().__init__()
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(num_experts)
        )

    def forward(self, x):
        b, n, d = x.shape
        flat = x.reshape(-1, d)
        probs = self.gate(flat).softmax(dim=-1)
        weights, chosen = probs.topk(self.k, dim=-1)
        capacity = int(self.capacity_factor * flat.shape[0] * self.k / self.num_experts)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, choice = torch.nonzero(chosen == e, as_tuple=True)
            token, choice = token[:capacity], choice[:capacity]
            out.index_add_(0, token, expert(flat[token]) * weights[token, choice, None])
        return out.reshape(b, n, d)


def _build(k: int):
    torch.manual_seed(0)
    return vit(lambda i: LoopMoE(DIM, HIDDEN, EXPERTS, k=k, capacity_factor=0.75))


def top1():
    return _build(1)


def top2():
    return _build(2)
