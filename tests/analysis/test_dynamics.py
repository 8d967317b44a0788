"""Layer dynamics: spectrum, token entropy, magnitudes, against hand-computed values and naive per-token loops."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from timm_remem.analysis.dynamics import (
    activation_magnitude,
    channel_spectrum,
    frequency_intensity,
    layer_dynamics,
    token_entropy,
)
from timm_remem.errors import ConfigError, UnsupportedModelError

# ----------------------------------------------------------------------------------------------------------------
# Naive references: one Python loop iteration per token, straight from the definitions.


def naive_spectrum(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    acc = torch.zeros(c, dtype=torch.float64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                acc += torch.fft.fft(x[i, :, r, s].double()).abs() / c
    return acc / (b * h * w)


def naive_entropy(x: torch.Tensor, lo: float, hi: float, bins: int = 100) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                hist = torch.histc(x[i, :, r, s].float(), bins=bins, min=lo, max=hi).double()
                p = hist / hist.sum()
                p = p[p > 0]
                out[i, r, s] = -(p * torch.log2(p)).sum()
    return out


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    with torch.no_grad():  # make blocks differ from identity-ish init so the checks can fail
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Pure functions against hand-computed values


def test_constant_channel_vector_has_only_dc():
    values = torch.tensor([2.0, -3.0, 0.5, 1.0, 4.0, -1.0])  # one constant per token
    x = values.view(1, 1, 2, 3).expand(1, 8, 2, 3).contiguous()
    spec = channel_spectrum(x)
    expected = torch.zeros(8)
    expected[0] = values.abs().mean()  # |sum of 8 copies of v| / 8 = |v|, averaged over tokens
    torch.testing.assert_close(spec, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("c,k", [(8, 3), (7, 2)])
def test_cosine_over_channels_peaks_at_its_frequency(c, k):
    ch = torch.arange(c, dtype=torch.float64)
    x = torch.cos(2 * math.pi * k * ch / c).float().view(1, c, 1, 1)
    expected = torch.zeros(c)
    expected[k] = expected[c - k] = 0.5  # |FFT| = C/2 at +-k, divided by C
    torch.testing.assert_close(channel_spectrum(x), expected, atol=1e-6, rtol=0)
    assert frequency_intensity(channel_spectrum(x)).item() == pytest.approx(1.0 / c, abs=1e-6)


@pytest.mark.parametrize("c", [16, 15])
def test_spectrum_matches_per_token_fft_loop(c):
    torch.manual_seed(1)
    x = torch.randn(2, c, 3, 2) * 3 + 1
    torch.testing.assert_close(channel_spectrum(x).double(), naive_spectrum(x), atol=1e-5, rtol=1e-5)


def test_two_equally_frequent_values_give_one_bit():
    x = torch.tensor([0.0, 5.0] * 4).view(1, 8, 1, 1)
    assert float(token_entropy(x)) == pytest.approx(1.0, abs=1e-12)


def test_entropy_hand_values_per_token():
    tokens = [
        [1.0, 1.0, 1.0, 1.0],  # one value -> 0 bits
        [0.0, 1.0, 2.0, 3.0],  # four distinct values, far apart -> 2 bits
        [0.0, 0.0, 0.0, 3.0],  # p = (3/4, 1/4)
    ]
    x = torch.tensor(tokens).t().reshape(1, 4, 1, 3)  # [B=1, C=4, H=1, W=3]
    ent = token_entropy(x, value_range=(0.0, 3.0), reduction="none").view(-1)
    h3 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    torch.testing.assert_close(ent.double(), torch.tensor([0.0, 2.0, h3], dtype=torch.float64), atol=1e-6, rtol=0)


def test_entropy_matches_histc_loop():
    torch.manual_seed(2)
    x = torch.randn(2, 64, 3, 3)
    lo, hi = float(x.min()), float(x.max())
    got = token_entropy(x, reduction="none").double()
    torch.testing.assert_close(got, naive_entropy(x, lo, hi), atol=1e-5, rtol=0)


def test_entropy_ignores_values_outside_range_like_histc():
    torch.manual_seed(3)
    x = torch.randn(1, 50, 2, 2) * 2
    got = token_entropy(x, value_range=(-1.0, 1.5), bins=10, reduction="none").double()
    torch.testing.assert_close(got, naive_entropy(x, -1.0, 1.5, bins=10), atol=1e-5, rtol=0)


def test_activation_magnitude_is_mean_abs():
    x = torch.tensor([[-2.0, 1.0], [0.5, -0.5]]).view(1, 2, 2, 1)
    assert float(activation_magnitude(x)) == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ConfigError, match="bins must be a positive int"):
        token_entropy(torch.randn(1, 4, 2, 2), bins=0)
    with pytest.raises(ConfigError, match="NaN"):
        channel_spectrum(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ConfigError, match="value_range"):
        token_entropy(torch.randn(1, 4, 2, 2), value_range=(1.0, 0.0))


# ----------------------------------------------------------------------------------------------------------------
# layer_dynamics on a real timm model


def test_layer_dynamics_matches_naive_reference(vit):
    torch.manual_seed(4)
    images = torch.randn(2, 3, 32, 32)
    dyn = layer_dynamics(vit, images)
    with torch.no_grad():
        feats = vit.forward_intermediates(images, intermediates_only=True)
    assert len(feats) == len(vit.blocks) == 6
    assert dyn.indices == list(range(6))
    assert dyn.spectrum.shape == (6, 64)
    lo = min(float(f.min()) for f in feats)
    hi = max(float(f.max()) for f in feats)
    for i, f in enumerate(feats):
        ref_spec = naive_spectrum(f)
        torch.testing.assert_close(dyn.spectrum[i].double(), ref_spec, atol=1e-5, rtol=1e-5)
        assert float(dyn.intensity[i]) == pytest.approx(float(ref_spec.mean()), rel=1e-5)
        assert float(dyn.entropy[i]) == pytest.approx(float(naive_entropy(f, lo, hi).mean()), abs=1e-5)
        assert float(dyn.magnitude[i]) == pytest.approx(float(f.abs().mean()), rel=1e-5)
    assert dyn.gradient is None


def test_layer_range_option_uses_each_layers_min_max(vit):
    torch.manual_seed(5)
    images = torch.randn(2, 3, 32, 32)
    dyn = layer_dynamics(vit, images, entropy_range="layer", bins=20, indices=[1, 4])
    with torch.no_grad():
        feats = vit.forward_intermediates(images, indices=[1, 4], intermediates_only=True)
    assert dyn.indices == [1, 4]
    for i, f in enumerate(feats):
        ref = naive_entropy(f, float(f.min()), float(f.max()), bins=20).mean()
        assert float(dyn.entropy[i]) == pytest.approx(float(ref), abs=1e-5)


def test_gradient_magnitude_matches_manual_backward(vit):
    torch.manual_seed(6)
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 3, 1])
    dyn = layer_dynamics(vit, images, gradient=True, target=labels)
    # Reference: run the blocks by hand, keep each block output's gradient.
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    outs = []
    for blk in vit.blocks:
        x = blk(x)
        x.retain_grad()
        outs.append(x)
    logits = vit.forward_head(vit.norm(x))
    logits.gather(1, labels[:, None]).sum().backward()
    ref = torch.stack([o.grad[:, vit.num_prefix_tokens :].abs().mean() for o in outs])
    torch.testing.assert_close(dyn.gradient, ref, rtol=1e-4, atol=1e-9)
    # class-token pooling: the last block's patch tokens do not reach the head, so only earlier blocks get gradient
    assert bool((ref[:-1] > 0).all()) and float(ref[-1]) == 0.0


def test_layer_dynamics_restores_training_mode(vit):
    vit.train()
    try:
        layer_dynamics(vit, torch.randn(1, 3, 32, 32))
        assert vit.training
    finally:
        vit.eval()


def test_model_without_forward_intermediates_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(UnsupportedModelError, match="has no forward_intermediates"):
        layer_dynamics(model, torch.randn(1, 3, 8, 8))


def test_bad_entropy_range_is_refused(vit):
    with pytest.raises(ConfigError, match="entropy_range must be one of"):
        layer_dynamics(vit, torch.randn(1, 3, 32, 32), entropy_range="batch")


def test_to_dict_is_json_serialisable(vit):
    import json

    dyn = layer_dynamics(vit, torch.randn(1, 3, 32, 32))
    data = json.loads(json.dumps(dyn.to_dict()))
    assert len(data["spectrum"]) == 6 and len(data["spectrum"][0]) == 64
