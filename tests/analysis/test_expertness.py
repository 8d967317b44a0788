"""MLP expertness: firing fractions, class selectivity and neuron-input graph statistics against hand-built toys."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from timm_remem.analysis.expertness import mlp_expertness, neuron_statistics
from timm_remem.errors import UnsupportedModelError


def naive_gini(values) -> float:
    x = np.asarray(values, dtype=float)
    return float(np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean()))


@pytest.fixture
def toy():
    """4 images x 2 tokens x 3 neurons: n0 fires on class 0 only, n1 always, n2 never (threshold 0)."""
    on, off = 0.3, -0.2
    hidden = torch.full((4, 2, 3), off)
    hidden[:2, :, 0] = on  # images 0, 1 (class 0)
    hidden[:, :, 1] = on
    labels = torch.tensor([0, 0, 1, 1])
    return hidden, labels


def test_fire_rates_and_dead_neurons(toy):
    hidden, labels = toy
    s = neuron_statistics(hidden, labels)
    assert s.fire_rate.tolist() == [0.5, 1.0, 0.0]
    assert s.dead_fraction == pytest.approx(1 / 3)
    assert s.density == pytest.approx(0.5)
    assert s.num_inputs == 8 and s.num_images == 4


def test_class_selectivity_index(toy):
    hidden, labels = toy
    s = neuron_statistics(hidden, labels)
    # n0: class means (1, 0) -> (1 - 0) / (1 + 0) = 1; n1: (1, 1) -> 0; n2 never fires -> 0
    assert s.selectivity.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert s.mean_selectivity == pytest.approx(1 / 3)


def test_selectivity_with_partial_rates():
    # 3 classes, one image each, 4 tokens; the neuron fires on 4, 2 and 0 tokens: means (1, .5, 0)
    hidden = -torch.ones(3, 4, 1)
    hidden[0, :, 0] = 1.0
    hidden[1, :2, 0] = 1.0
    s = neuron_statistics(hidden, torch.tensor([0, 1, 2]))
    mu_max, mu_rest = 1.0, (0.5 + 0.0) / 2
    assert float(s.selectivity[0]) == pytest.approx((mu_max - mu_rest) / (mu_max + mu_rest))


def test_neuron_input_graph_statistics(toy):
    hidden, labels = toy
    s = neuron_statistics(hidden, labels)
    # class-0 tokens activate 2 neurons, class-1 tokens 1 neuron: 4 inputs of each degree
    assert s.input_degree_hist.tolist() == [0, 4, 4, 0]
    assert s.neuron_gini == pytest.approx(naive_gini([0.5, 1.0, 0.0]))
    assert s.input_gini == pytest.approx(naive_gini([2, 2, 2, 2, 1, 1, 1, 1]))


def test_threshold_moves_the_firing_boundary(toy):
    hidden, labels = toy
    assert neuron_statistics(hidden, labels, threshold=0.5).fire_rate.tolist() == [0.0, 0.0, 0.0]
    assert neuron_statistics(hidden, labels, threshold=-0.5).fire_rate.tolist() == [1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


def test_model_with_hand_set_biases(data):
    """fc1 weights zero, biases +1/-1: GELU(+1) > 0 fires on every input, GELU(-1) < 0 never does."""
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.mlp.fc1.weight.zero_()
            bias = -torch.ones_like(blk.mlp.fc1.bias)
            bias[::2] = 1.0
            blk.mlp.fc1.bias.copy_(bias)
    blocks = mlp_expertness(model, data, progress=False)
    assert [b.index for b in blocks] == list(range(6))
    hidden = model.blocks[0].mlp.fc1.out_features
    expected = torch.zeros(hidden)
    expected[::2] = 1.0
    tokens = 12 * (model.patch_embed.num_patches + model.num_prefix_tokens)
    for b in blocks:
        assert torch.equal(b.fire_rate, expected)
        assert b.input_degree_hist[hidden // 2] == tokens and int(b.input_degree_hist.sum()) == tokens
        assert b.mean_selectivity == 0.0
        assert b.path.endswith("mlp.fc2")
    assert all(len(blk.mlp.fc2._forward_pre_hooks) == 0 for blk in model.blocks)


def test_model_fire_rates_match_manual_forward(data):
    torch.manual_seed(1)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3).eval()
    blocks = mlp_expertness(model, data, max_samples=9, progress=False)
    images = torch.cat([x for x, _ in data])[:9]
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for blk, got in zip(model.blocks, blocks, strict=True):
            x = x + blk.attn(blk.norm1(x))
            h = blk.mlp.act(blk.mlp.fc1(blk.norm2(x)))  # the MLP's hidden activation
            x = x + blk.mlp(blk.norm2(x))
            torch.testing.assert_close(got.fire_rate, (h > 0).float().mean((0, 1)))
            assert got.num_images == 9


def test_model_without_mlp_branches_is_refused(data):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModelError, match="MLP"):
        mlp_expertness(model, data, progress=False)
