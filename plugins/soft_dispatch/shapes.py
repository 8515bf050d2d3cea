"""Output shape and type of ``moe::SoftDispatch`` (see ``plugins/topk_route/shapes.py`` for the
expressions these functions take)."""

from __future__ import annotations


def output_dtypes(dtypes, num_experts: int, expert_major: int) -> tuple[str, ...]:
    """The slots in the tokens' dtype."""
    return (dtypes[0],)


def output_shapes(shapes, num_experts: int, expert_major: int, *, smax=max, smin=min) -> tuple[tuple, ...]:
    """Slots ``[n, B*p, D]`` (expert-major) or ``[B, S, D]`` from tokens ``[B, m, D]`` and dispatch ``[B, m, S]``."""
    images, _, dim = shapes[0]
    slots = shapes[1][2]
    return ((num_experts, images * (slots // num_experts), dim) if expert_major else (images, slots, dim),)
