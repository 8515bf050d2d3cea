"""Layers that torch.export cannot trace as written, and the traceable equivalents moe-export puts in
their place while it traces.

Each substitution is proven before it is used: the model runs on the probe images with and without
it and must give bit-identical outputs; the exported graph is then checked against the unchanged
model anyway (``exporter.export.export``). What was substituted is listed in the export report.

* **lucidrains' ``safe_one_hot``** (mixture-of-experts, st-moe-pytorch) sizes a one-hot by
  ``indexes.max()``, a data-dependent shape, then cuts it to ``max_length`` columns: the same as a
  one-hot of ``max_length + 1`` columns over indexes clamped to ``max_length``, cut the same way.
* **DeepSpeed's capacity** is a tensor that ``MOELayer.forward`` turns into a Python int
  (``C = int(C)``), which torch.export can only fix to the traced batch's value. The gate returns it
  instead as the same integer expression of the token count, ``max(ceil(S * a / E), min_capacity)``
  with ``a`` the exact value of DeepSpeed's float32 ``capacity_factor * k``; equality with DeepSpeed's
  own ``_capacity`` is checked for every token count up to ``CHECKED_TOKENS``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from exporter.errors import UserError

#: DeepSpeed's capacity rule is checked against its own function for every token count up to this.
CHECKED_TOKENS = 8192


@dataclass(frozen=True)
class Substitution:
    name: str
    what: str  # one line for the report
    find: Callable[[nn.Module], list]  # what to patch in this model (empty: it does not apply)
    patch: Callable[[list], contextlib.AbstractContextManager]


# --- lucidrains' safe_one_hot --------------------------------------------------------------------


def exact_one_hot(indexes: torch.Tensor, max_length: int) -> torch.Tensor:
    """``safe_one_hot(indexes, max_length)`` with a fixed width: rows of ``max_length`` columns, all zero
    where an index is ``>= max_length``."""
    return F.one_hot(indexes.clamp(max=max_length), max_length + 1)[..., :max_length]


def _one_hot_modules(model: nn.Module) -> list:
    """The Python modules of the model's layers that define a ``safe_one_hot(indexes, max_length)``."""
    import inspect

    found = {}
    for layer in model.modules():
        module = sys.modules.get(type(layer).__module__)
        fn = getattr(module, "safe_one_hot", None)
        if callable(fn) and fn is not exact_one_hot:
            try:
                params = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            if params == ["indexes", "max_length"]:
                found[module.__name__] = module
    return list(found.values())


@contextlib.contextmanager
def _patch_one_hot(modules: list) -> Iterator[None]:
    saved = [(m, m.safe_one_hot) for m in modules]
    for m in modules:
        m.safe_one_hot = exact_one_hot
    try:
        yield
    finally:
        for m, fn in saved:
            m.safe_one_hot = fn


# --- DeepSpeed's capacity ------------------------------------------------------------------------


def _deepspeed_gates(model: nn.Module) -> list:
    return [
        m
        for m in model.modules()
        if type(m).__module__ == "deepspeed.moe.sharded_moe" and type(m).__name__ == "TopKGate"
    ]


def deepspeed_capacity_rule(gate) -> tuple[Fraction, int, int]:
    """``(a, E, min_capacity)``: DeepSpeed's eval capacity is ``max(ceil(S * a / E), min_capacity)``
    for S tokens, with ``a`` the exact float32 value of ``eval_capacity_factor * k``."""
    if not gate.drop_tokens:
        raise UserError(
            "DeepSpeed gate with drop_tokens=False sizes its buffers by the busiest expert (a data-dependent "
            "shape); set drop_tokens=True with an eval_capacity_factor for a portable graph"
        )
    factor = gate.eval_capacity_factor * (2 if gate.k == 2 else gate.k)
    a = Fraction(float(torch.tensor(factor, dtype=torch.float32)))
    return a, int(gate.wg.out_features), int(gate.min_capacity)


def check_deepspeed_capacity(gate) -> None:
    """Our integer rule against DeepSpeed's own ``_capacity`` for every token count up to CHECKED_TOKENS."""
    from deepspeed.moe.sharded_moe import _capacity

    a, experts, minimum = deepspeed_capacity_rule(gate)
    factor = torch.tensor(gate.eval_capacity_factor * (2 if gate.k == 2 else gate.k))
    for tokens in range(1, CHECKED_TOKENS + 1):
        ours = max(-(-tokens * a.numerator // (a.denominator * experts)), minimum)
        theirs = int(_capacity(torch.empty(tokens, experts), factor, torch.tensor(minimum)))
        if ours != theirs:
            raise UserError(
                f"DeepSpeed's float32 capacity differs from the exact rule at {tokens} tokens ({theirs} against "
                f"{ours}): no exact dynamic-batch substitution for eval_capacity_factor={gate.eval_capacity_factor}"
            )


@contextlib.contextmanager
def _patch_deepspeed(gates: list) -> Iterator[None]:
    for gate in gates:
        check_deepspeed_capacity(gate)
        a, experts, minimum = deepspeed_capacity_rule(gate)
        original = gate.forward

        def forward(input, *args, _original=original, _a=a, _e=experts, _min=minimum, **kwargs):
            out = _original(input, *args, **kwargs)
            tokens = input.shape[0]
            capacity = torch.sym_max((tokens * _a.numerator + _a.denominator * _e - 1) // (_a.denominator * _e), _min)
            return (out[0], capacity, *out[2:])

        gate.forward = forward
    try:
        yield
    finally:
        for gate in gates:
            del gate.forward


SUBSTITUTIONS = (
    Substitution(
        "safe_one_hot",
        "safe_one_hot (a one-hot sized by indexes.max()) -> a one-hot of max_length + 1 columns, cut to max_length",
        _one_hot_modules,
        _patch_one_hot,
    ),
    Substitution(
        "deepspeed_capacity",
        "DeepSpeed TopKGate's capacity C (int(C) fixes it to the traced batch) -> the same integer rule of the "
        "token count, max(ceil(S*a/E), min_capacity)",
        _deepspeed_gates,
        _patch_deepspeed,
    ),
)


@contextlib.contextmanager
def substituted(model: nn.Module, probes: list[torch.Tensor]) -> Iterator[list[str]]:
    """Applies every substitution that finds something in ``model``, each proven on ``probes`` first
    (the same outputs, bit for bit); yields the report lines."""
    from exporter.models.capture import flatten_outputs

    def outputs():
        with torch.no_grad():
            return [flatten_outputs(model(x)) for x in probes]

    with contextlib.ExitStack() as stack:
        applied = [(s, targets) for s in SUBSTITUTIONS if (targets := s.find(model))]
        if not applied:
            yield []
            return
        torch.manual_seed(0)
        before = outputs()
        for sub, targets in applied:
            stack.enter_context(sub.patch(targets))
        torch.manual_seed(0)
        after = outputs()
        for b, a in zip(before, after):
            if len(b) != len(a) or not all(torch.equal(x, y) for x, y in zip(b, a)):
                names = ", ".join(s.name for s, _ in applied)
                raise UserError(f"substituting {names} changes the model's outputs; it cannot be exported as written")
        shapes = ", ".join("x".join(map(str, x.shape)) for x in probes)
        yield [f"substituted {s.what} (equal outputs on {shapes})" for s, _ in applied]
