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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from exporter.rewrite.plan import Decline
from plugins.topk_route.capacity import RULE_DEFAULTS, capacity, describe, finish
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
                closest, found = max(closest, result, key=_progress), None
                break
            if found is None:
                found = result
            found.capacities[one.images] = result.semantics.capacity
        if found is not None:
            return found
    raise Decline(f"routing not recognised: {closest}")


#: How far a hypothesis came, by the start of why it failed: the layer's routed tokens right but not its output
#: is further than tokens that are not the routed ones.
_PROGRESS = (
    "no hypothesis fits",
    "the capacity cannot be seen",
    "the expert inputs are not the routed tokens",
    "the layer's output is not the weighted sum",
)


def _progress(reason: str) -> int:
    return next((i for i, start in enumerate(_PROGRESS) if reason.startswith(start)), -1)


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
            unseen = "the capacity cannot be seen: no expert received more tokens than it keeps, and the expert "
            closest = max(closest, unseen + "inputs are not padded to it", key=_progress)
            continue
        routing = route_top_k(gates, k, C, bpr, by_token=by_token)
        table = _slot_tokens(routing, E, C)  # [G, E, C]
        for layout in ("e", "g") if seen.stacked else ("e",):
            buffers = _buffers(seen.expert_in, seen.stacked, layout, E, G, C, dim, padded, table)
            if buffers is None:
                continue
            for name, tokens in seen.tokens.items():
                if not _dispatch_matches(buffers, tokens.reshape(G, S, dim), table, rtol):
                    elsewhere = f"the expert inputs are not the routed tokens (tried k={k}, C={C})"
                    closest = max(closest, elsewhere, key=_progress)
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


@dataclass(frozen=True)
class CapacityFit:
    """A capacity rule that gives the capacities observed, at the simplest fraction ``a`` that does; every
    ``a`` between ``low`` and ``high`` (the ends open or closed as ``ceil``/``floor`` make them) does too."""

    rule: dict
    low: Fraction
    high: Fraction

    def extremes(self, tokens: int) -> tuple[int, int]:
        """The smallest and the largest capacity a fraction in the interval gives for ``tokens``."""
        r = self.rule
        base = -(-tokens // r["cap_pre"])
        if r["cap_ceil"]:  # a in (low, high]
            lo, hi = math.floor(base * self.low) + 1, math.ceil(base * self.high)
        else:  # a in [low, high)
            lo, hi = math.floor(base * self.low), math.ceil(base * self.high) - 1
        return finish(lo, tokens, r), finish(max(lo, hi), tokens, r)


def fit_capacity(observed: dict[int, int], experts: int = 1, k: int = 1) -> list[CapacityFit]:
    """Every capacity rule (``plugins.topk_route.capacity``) that gives the observed ``{group tokens:
    capacity}``: ``max(m, ceil(S*a))``, ``max(m, floor(S*a))`` and the latter capped at S (vmoe, GShard,
    DeepSpeed, the loop style), and tutel's ``k * floor(ceil(S/E)*a)``, with ``m`` 1 or the smallest
    capacity seen, each with the interval of fractions ``a`` the observations allow (its rule takes the
    likeliest: a short decimal capacity factor times ``k/E`` or ``1/E``, else the simplest fraction). A
    capacity at the minimum (or clamped to S) bounds ``a`` on one side only. Several may fit, and an
    interval may hold fractions that differ elsewhere: ``pin_capacity`` observes more."""
    fits: list[CapacityFit] = []
    forms = [dict(cap_pre=1, cap_mul=1)]
    if experts > 1:
        forms.append(dict(cap_pre=experts, cap_mul=k))
    for form, minimum, ceil in (
        (f, m, c) for f in forms for m in sorted({1, max(1, min(observed.values()))}) for c in (1, 0)
    ):
        for clamp in (0, 1) if not ceil and form["cap_pre"] == 1 else (0,):
            bounds = _bounds(observed, form, minimum, ceil, clamp)
            if bounds is None:
                continue
            low, high = bounds
            scales = [Fraction(1)] if form["cap_pre"] > 1 else [Fraction(k, experts), Fraction(1, experts)]
            a = _likeliest_between(low, high, scales, open_low=bool(ceil), open_high=not ceil)
            if a is None:
                continue
            rule = dict(cap_num=a.numerator, cap_den=a.denominator, cap_ceil=ceil, cap_min=minimum, cap_clamp=clamp)
            rule.update(form)
            if all(capacity(s, rule) == c for s, c in observed.items()) and all(f.rule != rule for f in fits):
                fits.append(CapacityFit(rule, low, high))
    return fits


def _bounds(observed: dict[int, int], form: dict, minimum: int, ceil: int, clamp: int):
    """``(low, high)`` of the fractions ``a`` one rule shape allows, or None (none does)."""
    low, high = Fraction(0), Fraction(10**6)
    for s, c in observed.items():
        base, mul = -(-s // form["cap_pre"]), form["cap_mul"]
        if c < minimum or (clamp and c > s):
            return None
        at_minimum, clamped = c == minimum, bool(clamp) and c == s
        if at_minimum and clamped:
            continue  # both ways bounded: nothing learnt about a
        if not at_minimum and c % mul:
            return None
        v = c // mul
        # ceil(b*a) = v  <=>  (v-1)/b < a <= v/b ;  floor(b*a) = v  <=>  v/b <= a < (v+1)/b
        lo, hi = (Fraction(v - 1, base), Fraction(v, base)) if ceil else (Fraction(v, base), Fraction(v + 1, base))
        if at_minimum:  # max(m, x) = m: x <= m, a bound from above only
            low_v, high_v = low, hi
        elif clamped:  # min(x, S) = S: x >= S, a bound from below only
            low_v, high_v = lo, high
        else:
            low_v, high_v = lo, hi
        low, high = max(low, low_v), min(high, high_v)
        if low >= high:  # (low, high] or [low, high): empty
            return None
    return low, high


def _unsettled(fits: list[CapacityFit], tokens: int) -> bool:
    """Whether the fits (any fraction in their intervals) give different capacities for ``tokens``."""
    return len({c for f in fits for c in f.extremes(tokens)}) > 1


def next_size(observed: dict[int, int], fits: list[CapacityFit], sizes: list[int]) -> int | None:
    """Where to observe the capacity next, or None where every fit agrees on every size.

    First the largest size where they disagree (its capacity narrows every interval the most); then the
    smallest where the fits' own rules (ceil or floor, clamped or not, ...) differ. Then, for each fit
    in turn, if its rule is the layer's rule, the observations at all of ``sizes`` would narrow its
    interval of fractions to the intersection of what each allows, whose two ends two sizes attain:
    those two are observed (the smaller size where several attain an end), and then no size is left
    unsettled. (An exact fraction at an interval's end, ``floor(S*21/80)``, is told from those just
    beside it only at sizes where ``S*21/80`` falls just short of an integer.) Where they are observed
    and fits of other shapes still disagree, the smallest size where they do."""
    unsettled = [s for s in sizes if _unsettled(fits, s)]
    if not unsettled:
        return None
    if max(observed) < unsettled[-1]:
        return unsettled[-1]  # the most any one size says: the intervals narrowed to about 1/size
    for size in unsettled:
        if len({capacity(size, f.rule) for f in fits}) > 1:
            return size  # the smallest where the likeliest rules of different shapes differ
    for fit in fits:
        ends = [s for s in _ends(fit, sizes) if s not in observed]
        if ends:
            return ends[0]
    return unsettled[0]


def _ends(fit: CapacityFit, sizes: list[int]) -> list[int]:
    """The sizes whose capacities under ``fit``'s own rule bound its interval the most, from above and
    from below (the smallest size where several do)."""
    rule = fit.rule
    form = {key: rule[key] for key in ("cap_pre", "cap_mul")}
    low, high, low_at, high_at = fit.low, fit.high, None, None
    for size in sizes:
        bounds = _bounds({size: capacity(size, rule)}, form, rule["cap_min"], rule["cap_ceil"], rule["cap_clamp"])
        if bounds is None:
            continue
        if bounds[0] > low:
            low, low_at = bounds[0], size
        if bounds[1] < high:
            high, high_at = bounds[1], size
    return [s for s in (high_at, low_at) if s is not None]


def pin_capacity(
    observed: dict[int, int],
    capacity_at: Callable[[int], int],
    sizes: list[int],
    experts: int,
    k: int,
    rounds: int = 6,
) -> dict:
    """The capacity rule of a layer whose capacity follows the group size: fitted to ``observed``
    (``{group tokens: capacity}``, extended in place), then observed with ``capacity_at(tokens)`` where
    ``next_size`` says, until every fit left agrees on all of ``sizes`` (Decline if none fits, or
    ``rounds`` observations do not settle it)."""
    for _ in range(rounds + 1):
        if zero := [s for s, c in sorted(observed.items()) if c < 1]:
            raise Decline(f"a capacity of 0 at {zero[0]} tokens (every choice dropped): TopKRoute keeps at least one")
        fits = fit_capacity(observed, experts, k)
        if not fits:
            seen_at = ", ".join(f"{c} at {s} tokens" for s, c in sorted(observed.items()))
            raise Decline(f"capacity rule not recognised: the capacity follows the batch ({seen_at})")
        size = next_size(observed, fits, sizes)
        if size is None:
            return fits[0].rule
        observed[size] = capacity_at(size)
    raise Decline(f"capacity rule not settled after {rounds} more batches: the rules that fit still differ")


def _likeliest_between(
    low: Fraction, high: Fraction, scales: list[Fraction], *, open_low: bool, open_high: bool
) -> Fraction | None:
    """The fraction in the interval most likely an author's: a capacity factor of the fewest decimal
    digits (up to 3) times one of ``scales`` (``k/E``, ``1/E``), else the simplest fraction."""
    for digits in range(4):
        unit = Fraction(1, 10**digits)
        for scale in scales:
            step = unit * scale  # a = n * step
            n = math.floor(low / step) + 1 if open_low else math.ceil(low / step)
            a = max(n, 1) * step
            if a < high or (a == high and not open_high):
                return a
    return _simplest_between(low, high, open_low=open_low, open_high=open_high)


def _simplest_between(low: Fraction, high: Fraction, *, open_low: bool, open_high: bool) -> Fraction | None:
    """The positive fraction with the smallest denominator in the interval (its ends open as said)."""
    for den in range(1, 4097):
        num = math.floor(low * den) + 1 if open_low else math.ceil(low * den)
        candidate = Fraction(max(num, 1), den)
        if candidate < high or (candidate == high and not open_high):
            return candidate
    return None
