"""The semantics of a top-k layer found from its values (``exporter.rewrite.topk_semantics``): capacity
rules fitted from a few group sizes and pinned down where they differ, against each author's own
formula at every size; ``identify`` on layers built from known settings (ties, dropped tokens, every
order and weighting), and declined with its reason when the values are not a top-k layer's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exporter.models.routing import normalized_weights, route_top_k
from exporter.rewrite.plan import Decline
from exporter.rewrite.topk_semantics import Observed, Semantics, fit_capacity, identify, pin_capacity
from plugins.topk_route.capacity import capacity

#: Each author's capacity for a group of S tokens, as their code computes it (floats where theirs are).
AUTHORS = {
    "gshard/lucidrains": lambda s, e, k, cf: max(min(s, int(s * cf / e)), 4),
    "deepspeed": lambda s, e, k, cf: max(math.ceil(s / e * cf * k), 4),
    "tutel": lambda s, e, k, cf: k * int(cf * math.ceil(s / e)),
    "cumsum style": lambda s, e, k, cf: max(int(k * s * cf / e), 1),
    "vmoe (no padding)": lambda s, e, k, cf: math.ceil(k * s * cf / e),
}


@pytest.mark.parametrize("author", sorted(AUTHORS))
@settings(max_examples=25, deadline=None)
@given(
    experts=st.sampled_from([2, 4, 8, 16, 32]),
    k=st.integers(1, 2),
    cf=st.sampled_from([0.25, 0.5, 1.0, 1.05, 1.25, 1.5, 2.0, 4.0]),
    per_image=st.sampled_from([16, 49, 64, 196]),
)
def test_a_fitted_capacity_rule_is_the_authors_formula_at_every_batch(author, experts, k, cf, per_image):
    formula = lambda s: AUTHORS[author](s, experts, k, cf)  # noqa: E731
    check = [per_image * b for b in range(1, 257)]
    assume(formula(per_image) >= 1)  # tutel's capacity 0 fails in tutel; declined here (below)
    observed = {per_image * b: formula(per_image * b) for b in (1, 2, 3)}
    asked = []
    rule = pin_capacity(observed, lambda s: asked.append(s) or formula(s), check, experts, k)
    wrong = [s for s in check if capacity(s, rule) != formula(s)]
    assert not wrong, (author, rule, wrong[:3])
    assert len(asked) <= 6, f"{len(asked)} more batches observed"


def test_a_fitted_rule_needs_no_more_observations_than_it_must():
    """vmoe's ceil(k*S*cf/E) at E=8, k=2, C=1.25 is ceil(S*5/16): two sizes pin the simplest fraction."""
    fits = fit_capacity({64: 20, 128: 40, 196: 62}, 8, 2)
    rule = fits[0].rule
    assert all(capacity(s, rule) == math.ceil(s * 5 / 16) for s in range(1, 5000))
    assert (rule["cap_num"], rule["cap_den"], rule["cap_ceil"]) == (5, 16, 1)


def test_no_rule_fits_capacities_that_follow_the_busiest_expert():
    """A capacity that is not a function of S (DeepSpeed without dropping: the busiest expert's load)."""
    assert fit_capacity({64: 30, 128: 37, 192: 44, 256: 140}, 4, 1) == []
    with pytest.raises(Decline, match=r"capacity rule not recognised: .*\(30 at 64 tokens, 37 at 128 tokens"):
        pin_capacity({64: 30, 128: 37}, lambda s: s // 2 + 50, [64 * b for b in range(1, 9)], 4, 1)


# --- identify ------------------------------------------------------------------------------------


def _layer(truth: Semantics, images: int, per_image: int, experts: int, dim: int, seed: int, ties: bool) -> Observed:
    """The values a top-k layer with ``truth``'s settings exposes at one batch: router probabilities,
    tokens, stacked expert buffers [E, G, C, D] and outputs, and the layer's output."""
    rng = np.random.default_rng(seed)
    G = 1 if truth.images is None else images // truth.images
    S = images * per_image // G
    logits = rng.standard_normal((G, S, experts)).astype(np.float32)
    if ties:
        logits = np.round(logits * 2) / 2  # many equal gates: the lower expert, the earlier token first
    gates = torch.softmax(torch.from_numpy(logits), -1)
    tokens = rng.standard_normal((G, S, dim)).astype(np.float32)
    routing = route_top_k(gates, truth.k, truth.capacity, truth.batch_priority, by_token=truth.by_token)
    buffers = np.zeros((experts, G, truth.capacity, dim), np.float32)
    kept = (routing.slot >= 0).numpy()
    g, s, c = np.nonzero(kept)
    e, slot = routing.expert.numpy()[g, s, c], routing.slot.numpy()[g, s, c]
    buffers[e, g, slot] = tokens[g, s]
    weights = rng.standard_normal((experts, dim, dim)).astype(np.float32) / dim**0.5
    outs = np.einsum("egcd,edf->egcf", buffers, weights)
    gate = gates.gather(-1, routing.expert)
    weight = normalized_weights(gate, routing.slot >= 0, truth.normalize, truth.eps)
    weight = torch.where(routing.slot >= 0, weight, torch.zeros_like(weight)).numpy()
    picked = outs[routing.expert.numpy(), np.arange(G)[:, None, None], routing.slot.clamp(min=0).numpy()]
    output = (picked * weight[..., None]).sum(axis=2)
    return Observed(
        images=images,
        gates=gates.numpy().reshape(images, per_image, experts),
        tokens={"x": tokens.reshape(images, per_image, dim)},
        expert_in=[buffers],
        expert_out={"y": [outs]},
        output=output.reshape(images, per_image, dim),
        stacked=True,
    )


def _kept(semantics: Semantics, seen: Observed) -> dict[tuple[int, int], tuple[int, float]]:
    """What the layer does under ``semantics``: ``(token in the batch, expert) -> (slot, weight)`` of every
    kept choice (a choice dropped does nothing, so two settings that keep the same are the same)."""
    G = 1 if semantics.images is None else seen.images // semantics.images
    gates = torch.from_numpy(seen.gates.reshape(G, -1, seen.experts))
    r = route_top_k(gates, semantics.k, semantics.capacity, semantics.batch_priority, by_token=semantics.by_token)
    kept = r.slot >= 0
    weight = normalized_weights(gates.gather(-1, r.expert), kept, semantics.normalize, semantics.eps)
    S = gates.shape[1]
    return {
        (g * S + t, int(r.expert[g, t, c])): (int(r.slot[g, t, c]), float(weight[g, t, c]))
        for g, t, c in torch.nonzero(kept).tolist()
    }


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 2),
    images=st.sampled_from([1, 2, None]),
    bpr=st.booleans(),
    by_token=st.booleans(),
    normalize=st.sampled_from([0, 1, 3]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_identify_finds_what_a_layer_built_with_known_settings_does(k, images, bpr, by_token, normalize, ties, seed):
    """Capacity below the load (tokens dropped, so the orders differ), ties or not: the semantics found
    keep exactly the (token, expert) choices the layer kept, in the same slots, with the same weights.
    (Settings can be equivalent on given values: k=2 whose second choices are all dropped is k=1.)"""
    by_token = by_token and k > 1
    capacity = 5 * k  # 4 images x 8 tokens over 4 experts: 8k choices an expert on average
    truth = Semantics(k, images, bpr, by_token, capacity, normalize=normalize, eps=1e-9 if normalize else 0.0)
    seen = [_layer(truth, 4, 8, 4, 6, seed, ties)]
    eps = [(1e-9, "Add")] if normalize == 1 else [(1e-9, "Max")] if normalize else []
    found = identify(seen, 1e-5, eps=eps).semantics
    got, want = _kept(found, seen[0]), _kept(truth, seen[0])
    assert got.keys() == want.keys(), (found, truth)
    assert all(got[c][0] == want[c][0] for c in got), (found, truth)
    assert all(abs(got[c][1] - want[c][1]) <= 1e-5 * max(1.0, abs(want[c][1])) for c in got), (found, truth)


def test_identify_tells_batch_priority_and_groups_apart():
    """A case where every hypothesis but the true one misplaces a token: the truth itself comes back."""
    truth = Semantics(2, 2, True, False, capacity=2, normalize=1, eps=1e-9)
    seen = [_layer(truth, 4, 16, 4, 8, seed=7, ties=False)]
    found = identify(seen, 1e-5, eps=[(1e-9, "Add")]).semantics
    assert (found.k, found.images, found.batch_priority, found.by_token, found.capacity, found.normalize) == (
        2,
        2,
        True,
        False,
        2,
        1,
    )


def test_identify_declines_an_output_that_is_not_the_experts_weighted_sum():
    truth = Semantics(1, 1, False, False, capacity=4)
    seen = _layer(truth, 2, 8, 4, 6, seed=1, ties=False)
    seen.output = np.tanh(seen.output)  # the layer does something else with its experts' outputs
    with pytest.raises(Decline, match="not the weighted sum of its experts' outputs"):
        identify([seen], 1e-5)


def test_identify_declines_buffers_that_are_not_the_routed_tokens():
    truth = Semantics(1, 1, False, False, capacity=4)
    seen = _layer(truth, 2, 8, 4, 6, seed=2, ties=False)
    seen.expert_in = [seen.expert_in[0][::-1].copy()]  # experts' buffers swapped
    with pytest.raises(Decline, match="the expert inputs are not the routed tokens"):
        identify([seen], 1e-5)


def test_a_capacity_of_zero_is_declined_with_where():
    """tutel's ``k * int(cf * ceil(S/E))`` is 0 for a small group (tutel itself fails there)."""
    with pytest.raises(Decline, match="a capacity of 0 at 16 tokens"):
        pin_capacity({16: 0, 32: 0, 48: 1}, lambda s: s // 48, [16 * b for b in range(1, 9)], 8, 1)
