"""Output shape and type of ``moe::TopKDispatch`` (see ``plugins/topk_route/shapes.py`` for the
expressions these functions take)."""

from __future__ import annotations


def output_dtypes(dtypes, num_experts: int) -> tuple[str, ...]:
    """The expert inputs in the tokens' dtype."""
    return (dtypes[0],)


def output_shapes(shapes, num_experts: int, *, smax=max, smin=min) -> tuple[tuple, ...]:
    """Expert inputs ``[E, G*C, D]`` from tokens ``[G, S, D]`` and the slot table ``[G, E*C]``."""
    groups, _, dim = shapes[0]
    capacity = shapes[1][1] // num_experts
    return ((num_experts, groups * capacity, dim),)
