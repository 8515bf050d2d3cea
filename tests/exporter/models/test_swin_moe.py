"""The Swin-MoE model (exporter.models.swin_moe): what the comparison with Microsoft's fixtures does not
show by itself. The forward pass equals Swin's own in tests/exporter/sources/checkpoints/test_swin_moe.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exporter.errors import UserError
from exporter.models.capture import run_with_routing
from exporter.models.swin_moe import (
    l2_normalize,
    routing_settings,
    shifted_window_mask,
    swin_moe_layers,
    unlimited_capacity_factor,
)
from exporter.sources.zoo import build_model, get_config


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("swin-moe-tiny"), seed=1)


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def test_the_whole_batch_is_one_routing_group(model):
    """An image's routing depends on the other images of its batch: capacity follows the batch size."""
    x = images(8)
    _, batch = run_with_routing(model, x)
    _, alone = run_with_routing(model, x[:1])
    layer = "layers.0.blocks.1.mlp"
    assert batch[layer].expert.shape == (1, 8 * 64, 1) and alone[layer].expert.shape == (1, 64, 1)
    m = dict(swin_moe_layers(model))[layer]
    assert m.capacity(8 * 64) == int(1.25 * 128) and m.capacity(64) == int(1.25 * 16)
    assert not torch.equal(batch[layer].slot[0, :64], alone[layer].slot[0])


def test_routing_settings_change_every_layer_and_restore_them(model):
    x = images(4)
    before, _ = run_with_routing(model, x)
    with routing_settings(model, capacity_factor=unlimited_capacity_factor(model), batch_priority=False):
        assert all(m.capacity_factor == 4.0 and not m.batch_priority for _, m in swin_moe_layers(model))
        _, routing = run_with_routing(model, x)
        assert all((r.slot >= 0).all() for r in routing.values())  # nothing drops
    assert all(m.capacity_factor == 1.25 and m.batch_priority for _, m in swin_moe_layers(model))
    after, _ = run_with_routing(model, x)
    assert torch.equal(before[0], after[0])
    with pytest.raises(UserError, match="finite"), routing_settings(model, capacity_factor=float("nan")):
        pass


def test_an_oversized_expert_buffer_is_refused(model):
    with routing_settings(model, capacity_factor=1e9), pytest.raises(UserError, match="expert activations"):
        run_with_routing(model, images(1))


def test_l2_normalize_is_f_normalize():
    x = torch.randn(7, 5)
    x[3] = 0  # the eps clamp
    assert torch.allclose(l2_normalize(x, dim=-1), F.normalize(x, dim=-1), atol=1e-7)
    assert torch.allclose(l2_normalize(x, dim=0), F.normalize(x, dim=0), atol=1e-7)


def test_shifted_windows_mask_across_regions():
    mask = shifted_window_mask(8, 4, 2)  # 4 windows of 16 tokens; the last row and column of windows split
    assert mask.shape == (4, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert not mask[0].any()  # the top-left window is one region
    assert (mask[3] == -100).sum() > (mask[1] == -100).sum() > 0  # the bottom-right one is four


def test_seeded_weights_are_reproducible_and_every_expert_differs():
    a, b = build_model(get_config("swin-moe-tiny"), seed=5), build_model(get_config("swin-moe-tiny"), seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    w = dict(swin_moe_layers(a))["layers.1.blocks.0.mlp"].experts.fc1_w
    assert all(not torch.equal(w[i], w[j]) for i in range(4) for j in range(i))
