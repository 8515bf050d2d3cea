"""Soft-MoE weights against a NumPy float64 transcription of ``SoftRouter.__call__``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import soft_moe_weights
from exporter.errors import UserError
from exporter.models.routing import soft_moe_logits


def reference_soft_moe(x: np.ndarray, mu: np.ndarray, scale: float, eps: float = 1e-6):
    def normalize(v, axis):
        return v * (1.0 / np.sqrt(np.square(v).sum(axis=axis, keepdims=True) + eps))

    xn, mun = normalize(x, -1), normalize(mu, 0)
    if xn.size < mun.size:
        xn = xn * scale
    else:
        mun = mun * scale
    logits = np.einsum("gmd,dnp->gmnp", xn, mun)
    dispatch = np.exp(logits - logits.max(axis=1, keepdims=True))
    dispatch /= dispatch.sum(axis=1, keepdims=True)
    combine = np.exp(logits - logits.max(axis=(2, 3), keepdims=True))
    combine /= combine.sum(axis=(2, 3), keepdims=True)
    return dispatch, combine


@settings(max_examples=60, deadline=None)
@given(
    groups=st.integers(1, 3),
    tokens=st.integers(1, 12),
    dim=st.integers(1, 16),
    experts=st.integers(1, 6),
    slots=st.integers(1, 3),
    scale=st.floats(0.1, 20.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_weights_equal_the_reference_transcription(groups, tokens, dim, experts, slots, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, tokens, dim))
    mu = rng.standard_normal((dim, experts, slots))
    dispatch, combine = soft_moe_weights(torch.from_numpy(x), torch.from_numpy(mu), scale)
    ref_dispatch, ref_combine = reference_soft_moe(x, mu, scale)
    np.testing.assert_allclose(dispatch.numpy(), ref_dispatch, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(combine.numpy(), ref_combine, rtol=1e-10, atol=1e-12)


def test_dispatch_sums_over_tokens_and_combine_over_all_slots():
    torch.manual_seed(0)
    dispatch, combine = soft_moe_weights(torch.randn(2, 7, 5), torch.randn(5, 3, 2), 2.0)
    assert dispatch.shape == combine.shape == (2, 7, 3, 2)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(2, 3, 2))
    torch.testing.assert_close(combine.sum(dim=(2, 3)), torch.ones(2, 7))


def test_eps_is_inside_the_rsqrt():
    """A zero token normalises to zero (not NaN) and then spreads its combine weights uniformly."""
    x = torch.zeros(1, 2, 4)
    x[0, 1] = 1e-4  # |x|^2 = 4e-8, far below eps: rsqrt(4e-8 + 1e-6) ~= 980, not 5000
    mu = torch.randn(4, 3, 1)
    logits = soft_moe_logits(x, mu, torch.tensor(1.0))
    assert torch.isfinite(logits).all()
    assert torch.equal(logits[0, 0], torch.zeros(3))
    expected = 1e-4 / np.sqrt(4e-8 + 1e-6)
    unit_mu = mu / mu.square().sum(0, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(logits[0, 1], expected * unit_mu.sum(0).reshape(3), rtol=1e-5, atol=1e-6)


def test_scale_placement_follows_the_reference_rule():
    """Scale goes on the smaller operand; both placements give the same logits up to rounding."""
    torch.manual_seed(1)
    x, mu, scale = torch.randn(1, 3, 8), torch.randn(8, 16, 1), torch.tensor(7.0)
    on_x = soft_moe_logits(x, mu, scale, scale_inputs=True)
    on_mu = soft_moe_logits(x, mu, scale, scale_inputs=False)
    torch.testing.assert_close(on_x, on_mu)
    assert torch.equal(soft_moe_logits(x, mu, scale), on_x)  # x (24) < mu (128): scale on x


def test_shapes_are_checked():
    with pytest.raises(UserError, match="expected x"):
        soft_moe_weights(torch.randn(2, 3), torch.randn(3, 2, 1), 1.0)
