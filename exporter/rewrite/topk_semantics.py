"""What a top-k MoE layer computes, found from the values one ONNX Runtime run exposes: the routing group,
k, the order experts fill their buffers in, the capacity, and the combine weights.

The layer's own tensors are the evidence: its router probabilities, the tokens it dispatches, what
each expert receives (a stacked ``[E, ...]`` buffer, or one input per expert, padded to the capacity
or holding just the kept tokens) and returns, and the layer's output. A hypothesis is accepted when
moe-export's routing (``exporter.models.routing.route_top_k``) with those settings puts exactly the
tokens the graph put into every expert buffer slot, and combining the graph's own expert outputs with
its weights gives the layer's output (to ``rtol`` of its scale). Hypotheses are tried simplest first;
the first that reproduces everything is the layer's semantics, so two that both would are equal on
these values (and the capacity rule is pinned down at more batches by ``fit_capacity``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from exporter.rewrite.plan import Decline
from plugins.topk_route.capacity import RULE_DEFAULTS, capacity, describe
from plugins.topk_route.spec import NORMALIZE

#: Epsilons a renormalising layer uses when the graph shows none: GShard/lucidrains and st-moe add or
#: clamp 1e-9, DeepSpeed clamps at float32's machine epsilon.
DEFAULT_EPS = {1: 1e-9, 2: 1e-9, 3: float(np.finfo(np.float32).eps)}


@dataclass(frozen=True)
class Semantics:
    """One top-k layer's routing, as ``TopKRoute``'s attributes say it."""

    k: int
    images: int | None  # images per routing group; None: the whole batch is one group
    batch_priority: bool
    by_token: bool
    capacity: int  # slots per expert at the probe's batch
    normalize: int = 0
    eps: float = 0.0
    rule: dict | None = None  # cap_* attributes when the capacity follows the group size

    def attrs(self) -> dict:
        """The ``TopKRoute`` node's attributes (all of them: TensorRT's parser reads what is there)."""
        fixed = self.rule is None
        return dict(
            k=self.k,
            capacity=self.capacity if fixed else 0,
            batch_priority=int(self.batch_priority),
            by_token=int(self.by_token),
            normalize=self.normalize,
            eps=float(self.eps),
            **(RULE_DEFAULTS if fixed else {**RULE_DEFAULTS, **self.rule}),
        )

    def describe(self) -> str:
        group = "the whole batch" if self.images is None else f"{self.images} image{'s' * (self.images > 1)}"
        order = "priority (top-1 gate)" if self.batch_priority else "token order"
        order += ", a token's choices together" if self.by_token else ", first choices first"
        weights = "raw gates" if not self.normalize else NORMALIZE[self.normalize].split(" (")[0]
        slots = describe(self.attrs()) if self.rule else str(self.capacity)
        return f"k={self.k}, groups of {group}, {order}, capacity {slots}, weights: {weights}"


@dataclass
class Observed:
    """The values of one layer at one batch of ``images`` images."""

    images: int
    gates: np.ndarray  # [..., E]
    tokens: dict[str, np.ndarray]  # candidate dispatched tokens (the router's input, its rounded copies)
    expert_in: list[np.ndarray]  # one stacked buffer, or one input per expert
    expert_out: dict[str, list[np.ndarray]]  # candidate expert outputs (as expert_in), by a name
    output: np.ndarray  # the layer's output, [..., D]
    stacked: bool

    @property
    def experts(self) -> int:
        return int(self.gates.shape[-1])

    @property
    def tokens_total(self) -> int:
        return int(self.gates.size // self.experts)


@dataclass
class Match:
    semantics: Semantics
    token_source: str  # the name of the tokens the experts receive
    output_source: str  # the name of the expert outputs the layer combines
    layout: str  # "e" ([E, G, C, D]) or "g" ([G, E, C, D]) for a stacked buffer; "e" per expert
    padded: bool = True  # per expert: each input holds C rows per group (else: only the kept tokens)
    notes: list[str] = field(default_factory=list)
    capacities: dict[int, int] = field(default_factory=dict)  # batch (images) -> capacity there


def _groups(images: int | None, batch: int, tokens: int) -> tuple[int, int] | None:
    """``(G, S)`` of a group of ``images`` (None: the batch) in a batch of ``batch`` images, ``tokens`` in all."""
    if images is None:
        return 1, tokens
    if batch % images:
        return None
    groups = batch // images
    return (groups, tokens // groups) if tokens % groups == 0 else None


def hypotheses(
    experts: int, batch: int, hint: dict | None, k_hint: int | None
) -> Iterator[tuple[int | None, int, bool, bool]]:
    """``(images per group, k, batch_priority, by_token)`` to try, the hinted ones first."""
    seen = set()
    if hint:
        first = (hint.get("images"), hint["k"], bool(hint.get("batch_priority")), bool(hint.get("by_token")))
        seen.add(first)
        yield first
    groups = [1, None] + [m for m in range(2, batch + 1) if batch % m == 0]
    if hint and hint.get("images") is not None:
        groups.insert(0, hint["images"])
    ks = [k_hint] if k_hint else []
    ks += [k for k in range(1, min(experts, 4) + 1) if k not in ks]
    for k in ks:
        for images in dict.fromkeys(groups):
            for bpr, by_token in ((False, False), (False, True), (True, False), (True, True)):
                if by_token and k == 1:
                    continue  # one choice: both orders are the same
                h = (images, k, bpr, by_token)
                if h not in seen:
                    seen.add(h)
                    yield h


def identify(
    seen: list[Observed],
    rtol: float,
    *,
    hint: dict | None = None,
    k_hint: int | None = None,
    eps: Iterable[tuple[float, str]] = (),
    only_hint: bool = False,
) -> Match:
    """The semantics that reproduce the layer's dispatch and output at every batch seen (Decline if
    none does, naming how far the best came). ``hint`` (moe-export's own recorded settings: images, k,
    batch_priority) is tried first (``only_hint``: alone); ``eps``: ``(value, op)`` of the small
    constants the layer's routing adds (Add) or clamps with (Max, Clip), which say its
    renormalisation. ``Match.capacities`` holds the capacity found at each batch."""
    first = seen[0]
    closest = "no hypothesis fits the expert buffers' sizes"
    for h in hypotheses(first.experts, first.images, hint, k_hint):
        if (
            only_hint
            and hint
            and h != (hint.get("images"), hint["k"], bool(hint.get("batch_priority")), bool(hint.get("by_token")))
        ):
            continue
        found: Match | None = None
        for one in seen:
            result = _identify_at(one, h, rtol, eps, found.semantics.normalize if found else None)
            if isinstance(result, str):
                closest, found = result, None
                break
            if found is None:
                found = result
            found.capacities[one.images] = result.semantics.capacity
        if found is not None:
            return found
    raise Decline(f"routing not recognised: {closest}")


def _identify_at(seen: Observed, h, rtol, eps, normalize: int | None) -> Match | str:
    """The match of hypothesis ``h`` at one batch, or why it fails."""
    import torch

    from exporter.models.routing import route_top_k

    images, k, bpr, by_token = h
    E, T = seen.experts, seen.tokens_total
    dim = next(iter(seen.tokens.values())).shape[-1]
    split = _groups(images, seen.images, T)
    if split is None or k > E:
        return "no hypothesis fits the batch"
    G, S = split
    gates = torch.from_numpy(seen.gates.reshape(G, S, E).astype(np.float32))
    closest = "no hypothesis fits the expert buffers' sizes"
    for C, padded in _capacities(seen, G, S, k, dim, gates, bpr, by_token):
        if C is None:
            closest = "the capacity cannot be seen: no expert received more tokens than it keeps, and the expert "
            closest += "inputs are not padded to it"
            continue
        routing = route_top_k(gates, k, C, bpr, by_token=by_token)
        table = _slot_tokens(routing, E, C)  # [G, E, C]
        for layout in ("e", "g") if seen.stacked else ("e",):
            buffers = _buffers(seen.expert_in, seen.stacked, layout, E, G, C, dim, padded, table)
            if buffers is None:
                continue
            for name, tokens in seen.tokens.items():
                if not _dispatch_matches(buffers, tokens.reshape(G, S, dim), table, rtol):
                    closest = f"the expert inputs are not the routed tokens (tried k={k}, C={C})"
                    continue
                semantics = Semantics(k, images, bpr, by_token, C)
                found = _combine(seen, routing, semantics, layout, padded, table, G, S, dim, rtol, eps, normalize)
                if found is None:
                    closest = "the layer's output is not the weighted sum of its experts' outputs (raw or "
                    closest += "renormalised gates)"
                    continue
                semantics, out_name = found
                return Match(semantics, name, out_name, layout, padded)
    return closest


def _capacities(seen: Observed, G, S, k, dim, gates, bpr, by_token) -> Iterator[tuple[int | None, bool]]:
    """``(C, padded)`` the expert inputs allow for groups ``G x S``: a stacked or padded buffer says C; a
    per-expert input holding only the kept tokens says it where an expert dropped some (else None)."""
    E = seen.experts
    if seen.stacked:
        rows, rest = divmod(seen.expert_in[0].size, E * G * dim)
        if not rest and rows > 0:
            yield rows, True
        return
    rows = [u.size // dim for u in seen.expert_in]
    if len(set(rows)) == 1 and rows[0] % G == 0 and rows[0] >= G:
        yield rows[0] // G, True
    if G != 1:
        return
    import torch

    from exporter.models.routing import route_top_k

    unlimited = route_top_k(gates, k, S * k, bpr, by_token=by_token)
    chosen = torch.bincount(unlimited.expert.reshape(-1), minlength=E).tolist()
    full = {r for r, c in zip(rows, chosen) if r < c}
    if any(r > c for r, c in zip(rows, chosen)):
        return
    if len(full) == 1:
        yield full.pop(), False
    elif not full:
        yield None, False


def _slot_tokens(routing, experts: int, capacity: int) -> np.ndarray:
    from exporter.models.vmoe import slot_tokens

    table = slot_tokens(routing, experts, capacity).numpy()
    return table.reshape(table.shape[0], experts, capacity)


def _buffers(expert_in, stacked, layout, E, G, C, dim, padded, table) -> list[np.ndarray] | None:
    """The graph's expert inputs as ``[E][G, C, D]`` (missing rows of unpadded inputs as NaN)."""
    if stacked:
        u = expert_in[0]
        if u.size != E * G * C * dim:
            return None
        u = u.reshape(E, G, C, dim) if layout == "e" else u.reshape(G, E, C, dim).transpose(1, 0, 2, 3)
        return list(u)
    out = []
    for e, u in enumerate(expert_in):
        if padded:
            if u.size != G * C * dim:
                return None
            out.append(u.reshape(G, C, dim))
        else:
            filled = int((table[0, e] >= 0).sum())
            if u.size != filled * dim:
                return None
            full = np.full((1, C, dim), np.nan, dtype=np.float64)
            full[0, :filled] = u.reshape(filled, dim)
            out.append(full)
    return out


def _dispatch_matches(buffers, tokens: np.ndarray, table: np.ndarray, rtol: float) -> bool:
    from exporter.compare import close

    got, want = [], []
    for e, u in enumerate(buffers):
        g, c = np.nonzero(table[:, e] >= 0)
        if g.size == 0:
            continue
        got.append(u[g, c])
        want.append(tokens[g, table[g, e, c]])
    if not got:
        return False
    got, want = np.concatenate(got), np.concatenate(want)
    return bool(np.isfinite(got).all()) and close(got.astype(np.float64), want.astype(np.float64), rtol)


def _combine(seen, routing, semantics, layout, padded, table, G, S, dim, rtol, eps_found, only_mode=None):
    """``(semantics with its weights, the expert outputs' name)`` whose weighted sum is the layer's
    output, or None."""
    import torch

    from exporter.compare import close
    from exporter.models.routing import normalized_weights

    E, C = seen.experts, semantics.capacity
    expected_y = seen.output.astype(np.float64).reshape(G, S, dim)
    kept = routing.slot >= 0
    gate = torch.from_numpy(seen.gates.reshape(G, S, E)).float().gather(-1, routing.expert)
    for name, outs in seen.expert_out.items():
        buffers = _buffers(outs, seen.stacked, layout, E, G, C, dim, padded, table)
        if buffers is None:
            continue
        stack = np.nan_to_num(np.stack(buffers).astype(np.float64))  # [E, G, C, D]
        g = np.arange(G)[:, None, None]
        picked = stack[routing.expert.numpy(), g, routing.slot.clamp(min=0).numpy()]  # [G, S, K, D]
        clamps = any(op in ("Max", "Clip") for _, op in eps_found)
        for mode in (0, 2, 3, 1) if clamps else (0, 1, 2, 3):
            if only_mode is not None and mode != only_mode:
                continue
            if mode and semantics.k == 1 and mode != 3:
                continue  # one choice renormalised is 1 whether before or after capacity: mode 3 covers it
            wanted = ("Max", "Clip") if mode in (2, 3) else ("Add",)
            eps = next((v for v, op in eps_found if op in wanted), DEFAULT_EPS.get(mode, 0.0)) if mode else 0.0
            weight = normalized_weights(gate, kept, mode, eps)
            weight = torch.where(kept, weight, torch.zeros_like(weight)).numpy().astype(np.float64)
            y = (picked * weight[..., None]).sum(axis=2)
            if close(y, expected_y, rtol):
                return replace(semantics, normalize=mode, eps=eps), name
    return None


# --- a capacity that follows the batch -----------------------------------------------------------


def fit_capacity(observed: dict[int, int], experts: int = 1, k: int = 1) -> list[dict]:
    """Every capacity rule (``plugins.topk_route.capacity``) of the simplest exact fraction that gives
    the observed ``{group tokens: capacity}``: ``max(m, ceil(S*a))``, ``max(m, floor(S*a))`` and the
    latter capped at S (vmoe, GShard, DeepSpeed, the loop style), and tutel's ``k * floor(ceil(S/E)*a)``,
    with ``a`` the simplest fraction in the range the observations allow and ``m`` 1 or the smallest
    capacity seen. Several may fit: the caller tells them apart at more batches."""
    rules = []
    tokens = sorted(observed)
    forms = [dict(cap_pre=1, cap_mul=1)]
    if experts > 1:
        forms.append(dict(cap_pre=experts, cap_mul=k))
    for form in forms:
        for minimum in sorted({1, min(observed.values())}):
            free = [s for s in tokens if observed[s] > minimum or minimum == 1]
            if not free or any(observed[s] % form["cap_mul"] for s in free):
                continue
            for ceil in (1, 0):
                low, high = Fraction(0), Fraction(10**6)
                for s in free:
                    c, base = observed[s] // form["cap_mul"], -(-s // form["cap_pre"])
                    # ceil(b*a) = c  <=>  (c-1)/b < a <= c/b ;  floor(b*a) = c  <=>  c/b <= a < (c+1)/b
                    lo, hi = (
                        (Fraction(c - 1, base), Fraction(c, base))
                        if ceil
                        else (Fraction(c, base), Fraction(c + 1, base))
                    )
                    low, high = max(low, lo), min(high, hi)
                a = _simplest_between(low, high, open_low=bool(ceil), open_high=not ceil)
                if a is None:
                    continue
                for clamp in (0, 1) if not ceil and form["cap_pre"] == 1 else (0,):
                    rule = dict(cap_num=a.numerator, cap_den=a.denominator, cap_ceil=ceil, cap_min=minimum)
                    rule.update(form, cap_clamp=clamp)
                    if all(capacity(s, rule) == observed[s] for s in tokens) and rule not in rules:
                        rules.append(rule)
    return rules


def _simplest_between(low: Fraction, high: Fraction, *, open_low: bool, open_high: bool) -> Fraction | None:
    """The positive fraction with the smallest denominator in the interval (its ends open as said)."""
    for den in range(1, 4097):
        num = math.floor(low * den) + 1 if open_low else math.ceil(low * den)
        candidate = Fraction(max(num, 1), den)
        if candidate < high or (candidate == high and not open_high):
            return candidate
    return None


def first_disagreement(rules: list[dict], sizes: Iterable[int]) -> int | None:
    """The first group size among ``sizes`` where the rules give different capacities, or None."""
    for s in sizes:
        if len({capacity(s, r) for r in rules}) > 1:
            return s
    return None
