"""``moe::TopKRoute`` in PyTorch, written the way the reference computes it (vmoe.moe's
``_get_top_experts_per_item_common``: stable top-k, a stable argsort by priority, a cumsum over
the passes) rather than the way the exported model does. Tests hold the model's routing
(``exporter.models.routing.route_top_k``, cumsum-free for ONNX) against this.

The other authors' variants are written the way they compute them too: a token's choices together
(``by_token``: a cumsum over tokens of "any choice is this expert", as loop-style layers' ``nonzero``
gives), and the combine weight renormalised over the chosen or the kept gates (``normalize``)."""

from __future__ import annotations

import torch

from plugins.topk_route.capacity import capacity as capacity_of
from plugins.topk_route.spec import DEFAULTS


def topk_route(
    gates: torch.Tensor, k: int, capacity: int, batch_priority: int, **attrs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert, slot, weight, slot_token)`` for gates ``[G, S, E]``; int32 indices, float32 weight.

    ``slot`` is the flat slot ``e*C + c`` of a kept choice, -1 when dropped; ``weight`` the combine
    weight of a kept choice (``normalize``), 0 when dropped; ``slot_token[g, e*C + c]`` the token in
    that slot, -1 if empty. ``capacity`` 0 takes C from the ``cap_*`` rule of the group size S.
    """
    attrs = {**DEFAULTS, **attrs}
    gates = gates.float()
    groups, tokens, experts = gates.shape
    capacity = capacity_of(tokens, {**attrs, "capacity": capacity})
    expert = torch.sort(-gates, dim=-1, stable=True).indices[..., :k]  # ties: the lower expert first
    gate = gates.gather(-1, expert)
    if batch_priority:  # descending top-1 gate, ties in token order
        order = torch.sort(-gate[..., 0], dim=-1, stable=True).indices
    else:
        order = torch.arange(tokens).expand(groups, tokens)
    ordered = expert.gather(1, order.unsqueeze(-1).expand(-1, -1, k))  # [G, S, K] in priority order
    one_hot = torch.nn.functional.one_hot(ordered, experts)  # [G, S, K, E]
    if attrs["by_token"]:  # token by token, all of a token's choices at once (no expert twice per token)
        position = one_hot.sum(dim=2).cumsum(dim=1) - 1  # [G, S, E]
        position = (position.unsqueeze(2) * one_hot).sum(-1)
    else:  # pass 0 for all tokens, then pass 1, ...
        by_pass = one_hot.transpose(1, 2).reshape(groups, k * tokens, experts)
        position = (by_pass.cumsum(dim=1) - 1).reshape(groups, k, tokens, experts).transpose(1, 2)
        position = (position * one_hot).sum(-1)  # [G, S, K] in priority order
    position = torch.empty_like(position).scatter_(1, order.unsqueeze(-1).expand(-1, -1, k), position)
    kept = position < capacity
    slot = torch.where(kept, expert * capacity + position, -1)
    table = torch.full((groups, experts * capacity + 1), -1, dtype=torch.int64)
    token = torch.arange(tokens).view(1, tokens, 1).expand(groups, tokens, k)
    table.scatter_(1, torch.where(kept, slot, experts * capacity).reshape(groups, -1), token.reshape(groups, -1))
    weight = torch.where(kept, normalized(gate, kept, attrs["normalize"], attrs["eps"]), torch.zeros_like(gate))
    return expert.to(torch.int32), slot.to(torch.int32), weight, table[:, :-1].to(torch.int32)


def normalized(gate: torch.Tensor, kept: torch.Tensor, mode: int, eps: float) -> torch.Tensor:
    """The combine weight of each chosen gate ``[..., K]`` (see ``spec.NORMALIZE``), before dropping."""
    if mode == 0:
        return gate
    eps = torch.tensor(eps, dtype=gate.dtype)
    if mode == 1:
        return gate / (choice_sum(gate) + eps)
    if mode == 2:
        return gate / torch.maximum(choice_sum(gate), eps)
    if mode == 3:
        return gate / torch.maximum(choice_sum(torch.where(kept, gate, 0.0)), eps)
    raise ValueError(f"normalize must be 0, 1, 2 or 3, got {mode}")


def choice_sum(gate: torch.Tensor) -> torch.Tensor:
    """``[..., 1]``: the k gates added in choice order, one at a time, as the kernel adds them (so the
    weights agree bit for bit)."""
    total = gate[..., :1]
    for c in range(1, gate.shape[-1]):
        total = total + gate[..., c : c + 1]
    return total
