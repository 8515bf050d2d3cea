"""lucidrains' ``st-moe-pytorch`` (0.1.8): top-n with a capacity per image, gates of the chosen n
renormalised (clamped at 1e-9) before capacity, experts in a ModuleList.

Its eval path draws ``uniform_`` noise for the second choice; with ``threshold_eval=0`` that draw never
changes the output, and moe-export replaces it by its mean (said in the export report)."""

from __future__ import annotations

import torch
from _parts import DIM, EXPERTS, FirstOutput, vit
from st_moe_pytorch import MoE


def build():
    torch.manual_seed(0)
    settings = dict(gating_top_n=2, threshold_eval=0.0, capacity_factor_eval=1.25, expert_hidden_mult=2)
    return vit(lambda i: FirstOutput(MoE(DIM, num_experts=EXPERTS, **settings)))
