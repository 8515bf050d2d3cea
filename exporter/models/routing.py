"""Routing math of both MoE families, exactly as the reference (google-research/vmoe) defines it.

Everything here has static shapes and uses only ops that export to portable ONNX (no CumSum, no
NonZero, no sort): the same functions run in the PyTorch models, in the exported graphs and in the
public reference functions ``vmoe_combine_weights`` and ``soft_moe_weights``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from exporter import settings
from exporter.errors import UserError

__all__ = [
    "TopKRouting",
    "compute_capacity",
    "route_top_k",
    "normalized_weights",
    "vmoe_combine_weights",
    "l2_normalize",
    "soft_moe_logits",
    "soft_moe_weights",
]


class TopKRouting(NamedTuple):
    """Routing decisions of one V-MoE layer, per group ``G``, token ``S`` and choice ``K``.

    Attributes:
        expert: ``[G, S, K]`` int64, the expert chosen by each (token, choice), kept or not.
        slot: ``[G, S, K]`` int64, the position in that expert's buffer, ``-1`` when dropped.
        weight: ``[G, S, K]`` float32, the raw softmax gate of a kept choice (no renormalization),
            ``0`` when dropped.
    """

    expert: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor


def check_capacity_factor(capacity_factor) -> None:
    """A capacity factor must be a finite number above 0."""
    if capacity_factor is None or not 0 < capacity_factor < math.inf:
        raise UserError(f"capacity factor must be > 0 and finite, got {capacity_factor}")


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    ceil_or_round: str = settings.DEFAULT_CAPACITY_CEIL_OR_ROUND,
    multiple_of: int | None = settings.DEFAULT_CAPACITY_MULTIPLE_OF,
) -> int:
    """Capacity per expert and group, as ``vmoe.moe.compute_capacity``.

    ``num_tokens`` is ``group_size * k``. Python float arithmetic in the reference's order, then
    rounded up to ``multiple_of`` (``None`` or ``0`` disables the padding).
    """
    check_capacity_factor(capacity_factor)
    if ceil_or_round == "ceil":
        capacity = int(math.ceil(num_tokens * capacity_factor / num_experts))
    elif ceil_or_round == "round":
        capacity = int(round(num_tokens * capacity_factor / num_experts))  # half to even, as Python
    else:
        raise UserError(f"ceil_or_round must be 'ceil' or 'round', got {ceil_or_round!r}")
    if capacity < 1:
        raise UserError(
            f"num_tokens={num_tokens}, num_experts={num_experts} and capacity factor "
            f"{capacity_factor} give capacity {capacity}; it must be >= 1"
        )
    if multiple_of and multiple_of > 0:
        capacity += (-capacity) % multiple_of
    return capacity


def _top_k_first_index(gates: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Top-k over the last axis with ties going to the lower index, as ``jax.lax.top_k``.

    Built from ArgMax (documented to return the first maximum in PyTorch and ONNX) rather than
    TopK, whose tie order ``torch.topk`` does not document.
    """
    num_experts = gates.shape[-1]
    expert_ids = torch.arange(num_experts, device=gates.device)
    masked = gates
    indices, values = [], []
    for _ in range(k):
        index = masked.argmax(dim=-1)
        values.append(gates.gather(-1, index.unsqueeze(-1)).squeeze(-1))
        indices.append(index)
        masked = masked.masked_fill(index.unsqueeze(-1) == expert_ids, float("-inf"))
    return indices, values


def _goes_before(priority: torch.Tensor | None, group_size: int, device) -> torch.Tensor:
    """``before[.., i, j] = 1`` when token ``j`` takes a buffer slot before token ``i``.

    Vanilla routing: token order. Batch Prioritized Routing: descending priority with a stable
    tie-break (the lower token index first), as the reference's stable ``argsort(-priority)``.
    """
    token = torch.arange(group_size, device=device)
    earlier = token.unsqueeze(0) < token.unsqueeze(1)  # [S, S]: j < i
    if priority is None:
        return earlier.float()
    p_i = priority.unsqueeze(-1)
    p_j = priority.unsqueeze(-2)
    return ((p_j > p_i) | ((p_j == p_i) & earlier)).float()  # [G, S, S]


def route_top_k(
    gates: torch.Tensor,
    k: int,
    capacity: int,
    batch_priority: bool,
    *,
    by_token: bool = False,
    normalize: int = 0,
    eps: float = 0.0,
) -> TopKRouting:
    """Top-k routing with a fixed capacity per expert, vanilla or Batch Prioritized.

    Reproduces ``vmoe.moe._get_top_experts_per_item_common`` without its cumsum and argsort: the
    buffer position of (token i, choice c) in expert e is the number of choices that take a slot of
    e before it, i.e. every choice of an earlier pass plus the same-pass choices of tokens that go
    before i. Those counts are matmuls of 0/1 matrices, exact in float32 for groups below 2**24
    tokens.

    Other authors' layers differ in two ways, both covered: ``by_token`` places a token's choices
    together, in token (or priority) order, as loop-style layers do (there are no passes: a token
    never chooses an expert twice, so its position in e counts the tokens before it that chose e in
    any pass); ``normalize`` renormalises the combine weights (``plugins.topk_route.spec.NORMALIZE``).

    Args:
        gates: ``[G, S, E]`` router probabilities.
        k: Experts per token.
        capacity: Buffer slots per expert and group.
        batch_priority: Batch Prioritized Routing (priority = top-1 gate) instead of token order.
        by_token: A token's choices together instead of pass by pass.
        normalize: 0 raw gates; 1 over the chosen gates + eps; 2 over max(chosen, eps); 3 over max(kept, eps).
        eps: The epsilon of ``normalize``.
    """
    gates = gates.float()
    num_groups, group_size, num_experts = gates.shape
    indices, values = _top_k_first_index(gates, k)
    expert_ids = torch.arange(num_experts, device=gates.device)
    choice = torch.stack([(i.unsqueeze(-1) == expert_ids) for i in indices], dim=2).float()  # [G,S,K,E]
    before = _goes_before(values[0] if batch_priority else None, group_size, gates.device)
    if by_token:
        earlier_tokens = torch.matmul(before, choice.sum(dim=2))  # [G,S,E]: tokens before i that chose e
        position = earlier_tokens.unsqueeze(2)
    else:
        same_pass = torch.matmul(before, choice.reshape(num_groups, group_size, k * num_experts))
        same_pass = same_pass.reshape(num_groups, group_size, k, num_experts)
        per_pass = choice.sum(dim=1)  # [G, K, E]: how many tokens chose e in pass c
        earlier_passes = [torch.zeros_like(per_pass[:, 0])]
        for c in range(1, k):
            earlier_passes.append(earlier_passes[-1] + per_pass[:, c - 1])
        position = same_pass + torch.stack(earlier_passes, dim=1).unsqueeze(1)  # [G,S,K,E]
    position = (position * choice).sum(dim=-1).to(torch.int64)  # [G,S,K]
    kept = position < capacity
    expert = torch.stack(indices, dim=-1)
    weight = normalized_weights(torch.stack(values, dim=-1), kept, normalize, eps)
    return TopKRouting(
        expert=expert,
        slot=torch.where(kept, position, torch.full_like(position, -1)),
        weight=torch.where(kept, weight, torch.zeros_like(weight)),
    )


def normalized_weights(gate: torch.Tensor, kept: torch.Tensor, normalize: int, eps: float) -> torch.Tensor:
    """Combine weights of the chosen gates ``[G, S, K]`` before dropping (``route_top_k``'s ``normalize``);
    the k gates are added in choice order, one at a time, as the plugin kernel adds them."""
    if normalize == 0:
        return gate
    if normalize not in (1, 2, 3):
        raise UserError(f"normalize must be 0, 1, 2 or 3, got {normalize}")
    summed = torch.where(kept, gate, torch.zeros_like(gate)) if normalize == 3 else gate
    total = summed[..., :1]
    for c in range(1, gate.shape[-1]):
        total = total + summed[..., c : c + 1]
    eps_t = torch.tensor(eps, dtype=gate.dtype, device=gate.device)
    return gate / (total + eps_t if normalize == 1 else torch.maximum(total, eps_t))


def vmoe_combine_weights(
    gates: torch.Tensor,
    *,
    k: int,
    capacity: int | None = None,
    capacity_factor: float | None = None,
    batch_priority: bool,
    ceil_or_round: str = settings.DEFAULT_CAPACITY_CEIL_OR_ROUND,
    multiple_of: int | None = settings.DEFAULT_CAPACITY_MULTIPLE_OF,
) -> torch.Tensor:
    """V-MoE combine weights ``[G, S, E, C]`` for router gates ``[G, S, E]``.

    Equal to the reference's ``EinsumDispatcher.combine_weights``: the raw gate of every kept
    (token, expert) pair at its buffer position, 0 elsewhere. The dispatch mask is ``combine > 0``
    (a kept choice whose gate is exactly 0 still takes its slot but contributes nothing).

    Args:
        gates: ``[G, S, E]`` router probabilities.
        k: Experts per token (1 <= k <= E).
        capacity: Buffer slots per expert and group. Give this or ``capacity_factor``.
        capacity_factor: Sets the capacity from ``S * k / E`` as ``compute_capacity``.
        batch_priority: Batch Prioritized Routing instead of token order.
        ceil_or_round: How ``compute_capacity`` rounds.
        multiple_of: ``compute_capacity`` pads the capacity to a multiple of this.
    """
    if gates.ndim != 3:
        raise UserError(f"gates must be [G, S, E], got shape {tuple(gates.shape)}")
    _, group_size, num_experts = gates.shape
    if not 1 <= k <= num_experts:
        raise UserError(f"k must be between 1 and the number of experts ({num_experts}), got {k}")
    if (capacity is None) == (capacity_factor is None):
        raise UserError("give exactly one of capacity and capacity_factor")
    if capacity is None:
        capacity = compute_capacity(group_size * k, num_experts, capacity_factor, ceil_or_round, multiple_of)
    elif capacity < 1:
        raise UserError(f"capacity must be >= 1, got {capacity}")
    routing = route_top_k(gates, k, capacity, batch_priority)
    on_expert = F.one_hot(routing.expert, num_experts).to(gates.dtype)  # [G,S,K,E]
    on_slot = (routing.slot.unsqueeze(-1) == torch.arange(capacity, device=gates.device)).to(gates.dtype)
    weight = routing.weight.to(gates.dtype)
    return torch.einsum("gske,gskc->gsec", on_expert * weight.unsqueeze(-1), on_slot)


def l2_normalize(x: torch.Tensor, dim: int, eps: float = settings.SOFT_MOE_NORM_EPS) -> torch.Tensor:
    """``x * rsqrt(sum(x*x) + eps)``: the reference's normalisation, eps inside the rsqrt."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


def soft_moe_logits(
    x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, *, scale_inputs: bool | None = None
) -> torch.Tensor:
    """Soft-MoE router logits ``[G, m, n*p]`` for tokens ``[G, m, d]`` and slots ``mu [d, n, p]``.

    ``scale`` multiplies whichever normalised operand has fewer elements, as the reference does
    (the two choices differ only in rounding). ``scale_inputs=None`` decides by the element counts of
    the whole batch, exactly as the reference; the models decide per image so that the choice does not
    depend on the batch size of an exported graph.
    """
    d, n, p = mu.shape
    xn = l2_normalize(x, dim=-1)
    mun = l2_normalize(mu, dim=0)
    if scale_inputs is None:
        scale_inputs = xn.numel() < mun.numel()
    if scale_inputs:
        xn = xn * scale
    else:
        mun = mun * scale
    return torch.matmul(xn, mun.reshape(d, n * p))


def soft_moe_weights(x: torch.Tensor, mu: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-MoE dispatch and combine weights, both ``[G, m, n, p]``.

    Dispatch is a softmax over the ``m`` tokens of each group (every slot is a convex combination of
    tokens); combine is a softmax over all ``n*p`` slots (every token is a convex combination of slot
    outputs). As ``vmoe/projects/soft_moe/router.py: SoftRouter``.
    """
    if x.ndim != 3 or mu.ndim != 3 or x.shape[-1] != mu.shape[0]:
        raise UserError(f"expected x [G, m, d] and mu [d, n, p], got {tuple(x.shape)} and {tuple(mu.shape)}")
    scale = torch.as_tensor(scale, dtype=x.dtype)
    _, n, p = mu.shape
    logits = soft_moe_logits(x, mu, scale)
    dispatch = torch.softmax(logits, dim=1)
    combine = torch.softmax(logits, dim=-1)
    shape = (*logits.shape[:2], n, p)
    return dispatch.reshape(shape), combine.reshape(shape)
