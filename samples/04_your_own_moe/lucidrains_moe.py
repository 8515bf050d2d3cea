"""lucidrains' ``mixture-of-experts`` (0.2.3): GShard top-2 per image, capacity ``max(min(S, int(S*cf/E)), 4)``,
gates of the chosen two renormalised (+1e-9) before capacity.

Deterministic in eval only with ``second_policy_eval='all'`` (the default, 'random', draws noise)."""

from __future__ import annotations

import torch
from _parts import DIM, EXPERTS, HIDDEN, FirstOutput, vit
from mixture_of_experts import MoE


def build():
    torch.manual_seed(0)
    moe = lambda i: FirstOutput(  # noqa: E731
        MoE(DIM, num_experts=EXPERTS, hidden_dim=HIDDEN, second_policy_eval="all", capacity_factor_eval=1.25)
    )
    return vit(moe)
