"""Output shape and type of ``moe::TopKCombine`` (see ``plugins/topk_route/shapes.py`` for the
expressions these functions take)."""

from __future__ import annotations


def output_dtypes(dtypes, **attrs) -> tuple[str, ...]:
    """The combined tokens in the expert outputs' dtype."""
    return (dtypes[0],)


def output_shapes(shapes, *, smax=max, smin=min, **attrs) -> tuple[tuple, ...]:
    """Tokens ``[G, S, D]`` from expert outputs ``[E, G*C, D]`` and slots ``[G, S, k]``."""
    groups, tokens, _ = shapes[1]
    return ((groups, tokens, shapes[0][2]),)
