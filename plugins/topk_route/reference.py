"""``moe::TopKRoute`` in PyTorch, written the way the reference computes it (vmoe.moe's
``_get_top_experts_per_item_common``: stable top-k, a stable argsort by priority, a cumsum over
the passes) rather than the way the exported model does. Tests hold the model's routing
(``exporter.models.routing.route_top_k``, cumsum-free for ONNX) against this."""

from __future__ import annotations

import torch


def topk_route(
    gates: torch.Tensor, k: int, capacity: int, batch_priority: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert, slot, weight, slot_token)`` for gates ``[G, S, E]``; int32 indices, float32 weight.

    ``slot`` is the flat slot ``e*C + c`` of a kept choice, -1 when dropped; ``weight`` the raw gate
    of a kept choice, 0 when dropped; ``slot_token[g, e*C + c]`` the token in that slot, -1 if empty.
    """
    gates = gates.float()
    groups, tokens, experts = gates.shape
    expert = torch.sort(-gates, dim=-1, stable=True).indices[..., :k]  # ties: the lower expert first
    gate = gates.gather(-1, expert)
    if batch_priority:  # descending top-1 gate, ties in token order
        order = torch.sort(-gate[..., 0], dim=-1, stable=True).indices
    else:
        order = torch.arange(tokens).expand(groups, tokens)
    ordered = expert.gather(1, order.unsqueeze(-1).expand(-1, -1, k))  # [G, S, K] in priority order
    one_hot = torch.nn.functional.one_hot(ordered, experts)  # [G, S, K, E]
    by_pass = one_hot.transpose(1, 2).reshape(groups, k * tokens, experts)  # pass 0 for all tokens, then 1, ...
    position = (by_pass.cumsum(dim=1) - 1).reshape(groups, k, tokens, experts).transpose(1, 2)
    position = (position * one_hot).sum(-1)  # [G, S, K] in priority order
    position = torch.empty_like(position).scatter_(1, order.unsqueeze(-1).expand(-1, -1, k), position)
    kept = position < capacity
    slot = torch.where(kept, expert * capacity + position, -1)
    table = torch.full((groups, experts * capacity + 1), -1, dtype=torch.int64)
    token = torch.arange(tokens).view(1, tokens, 1).expand(groups, tokens, k)
    table.scatter_(1, torch.where(kept, slot, experts * capacity).reshape(groups, -1), token.reshape(groups, -1))
    weight = torch.where(kept, gate, torch.zeros_like(gate))
    return expert.to(torch.int32), slot.to(torch.int32), weight, table[:, :-1].to(torch.int32)
