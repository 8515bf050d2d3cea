"""Collect the routing decisions of every V-MoE layer during one forward pass.

A context variable rather than module state, so that the same code path runs in eager PyTorch and
under torch.export (which executes the Python of a non-strict trace) and nothing leaks between calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from exporter.errors import UserError
from exporter.models.routing import TopKRouting

_ACTIVE: ContextVar[list | None] = ContextVar("moe_export_routing", default=None)


def record(layer: nn.Module, routing: TopKRouting) -> None:
    """Called by a V-MoE layer with its routing; a no-op outside ``capture_routing``."""
    records = _ACTIVE.get()
    if records is not None:
        records.append((layer, routing))


@contextmanager
def capture_routing() -> Iterator[list[tuple[nn.Module, TopKRouting]]]:
    """``with capture_routing() as records: model(x)`` fills ``records`` with (layer, routing)."""
    records: list = []
    token = _ACTIVE.set(records)
    try:
        yield records
    finally:
        _ACTIVE.reset(token)


def layer_names(model: nn.Module, records) -> list[str]:
    """Qualified module names of the recorded layers, in call order."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names.get(id(layer), f"moe{i}") for i, (layer, _) in enumerate(records)]


def flatten_outputs(out) -> list[torch.Tensor]:
    """A model's output (a tensor, or tuples, lists and dicts of them) as a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten_outputs(o)]
    raise UserError(f"model output of type {type(out).__name__} is not a tensor, tuple, list or dict of tensors")


def run_with_routing(model: nn.Module, images: torch.Tensor):
    """(flat outputs, {layer name: TopKRouting}) of one no-grad forward pass. A model that fails on
    the input's shape (PyTorch raises RuntimeError, ValueError or IndexError for those) is a user
    error naming the shape; anything else propagates."""
    with torch.no_grad(), capture_routing() as records:
        try:
            out = flatten_outputs(model(images))
        except (RuntimeError, ValueError, IndexError) as e:
            shape = "x".join(map(str, images.shape))
            raise UserError(f"model does not run on input {shape}: {type(e).__name__}: {e}") from None
    return out, dict(zip(layer_names(model, records), (r for _, r in records)))
