"""lucidrains' ``soft-moe-pytorch`` (0.1.9): ``SoftMoE`` with RMSNorm gains on tokens and slot embeddings
``[E, p, d]``, experts in a ModuleList (``offload_unused_experts_to_cpu=False``: nothing to offload on one
device, and moving modules in forward cannot be traced)."""

from __future__ import annotations

import torch
from _parts import DIM, EXPERTS, vit
from soft_moe_pytorch import SoftMoE


def build():
    torch.manual_seed(0)
    return vit(lambda i: SoftMoE(DIM, num_experts=EXPERTS, num_slots=2, offload_unused_experts_to_cpu=False))
