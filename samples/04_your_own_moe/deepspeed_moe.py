"""DeepSpeed's ``deepspeed.moe.layer.MoE`` (0.19.8, installed with ``DS_BUILD_OPS=0``; one process, no
process group): the whole batch is one routing group, so the capacity ``max(ceil(S/E*cf*k), min_capacity)``
follows the batch size.

Deterministic in eval only with ``use_rts=False`` (random token selection) and
``top2_2nd_expert_sampling=False`` (Gumbel noise on the second choice). With k = 1, an expert that
overflows keeps whichever of its tokens ``torch.topk`` returns first among equal mask values, an order
PyTorch does not define: ``top1`` uses a capacity factor at which nothing drops; ``top2`` drops."""

from __future__ import annotations

import torch
from _parts import DIM, EXPERTS, HIDDEN, FirstOutput, vit
from deepspeed.moe.layer import MoE
from torch import nn


def _moe(k: int, capacity_factor: float):
    def make(i):
        expert = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM))
        return FirstOutput(
            MoE(
                DIM,
                expert,
                num_experts=EXPERTS,
                k=k,
                eval_capacity_factor=capacity_factor,
                min_capacity=4,
                use_rts=False,
                top2_2nd_expert_sampling=False,
            )
        )

    torch.manual_seed(0)
    return vit(make)


def top1():
    return _moe(1, float(EXPERTS))  # capacity = the batch's tokens: nothing drops


def top2():
    return _moe(2, 0.5)  # a quarter of the choices fit
