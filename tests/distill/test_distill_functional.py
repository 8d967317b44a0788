"""Tests for timm_remem.distill.functional: kd_loss and spectral_loss against hand-written references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from distill_refs import (
    make_logits,
    ref_kl_batchmean,
)

from timm_remem.distill import (
    kd_loss,
    spectral_loss,
)
from timm_remem.errors import ConfigError


@pytest.fixture
def logits():
    return make_logits()


def test_kd_loss_matches_manual_kl_at_t1(logits):
    s, t, _ = logits
    assert float(kd_loss(s, t, 1.0)) == pytest.approx(ref_kl_batchmean(s.numpy(), t.numpy(), 1.0), rel=1e-5)


def test_kd_loss_matches_manual_kl_at_t4_including_t_squared(logits):
    s, t, _ = logits
    expected = ref_kl_batchmean(s.numpy(), t.numpy(), 4.0)
    assert float(kd_loss(s, t, 4.0)) == pytest.approx(expected, rel=1e-5)
    # T^2 is there: without it the value would be 16x smaller
    assert float(kd_loss(s, t, 4.0)) > 10 * expected / 16


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "hot"])
def test_kd_loss_rejects_bad_temperature(logits, bad):
    s, t, _ = logits
    with pytest.raises(ConfigError, match="temperature must be a positive finite number"):
        kd_loss(s, t, bad)


def test_kd_loss_rejects_class_count_mismatch():
    with pytest.raises(ConfigError, match="teacher has 7 classes but student has 5"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 7))


def test_kd_loss_rejects_batch_and_rank_mismatch():
    with pytest.raises(ConfigError, match="batch sizes differ"):
        kd_loss(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(ConfigError, match=r"\[batch, num_classes\]"):
        kd_loss(torch.randn(2, 5, 1), torch.randn(2, 5, 1))


def ref_spectral(s: np.ndarray, t: np.ndarray) -> float:
    diffs = []
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            fs, ft = np.fft.rfft2(s[b, c], norm="ortho"), np.fft.rfft2(t[b, c], norm="ortho")
            diffs.append(((fs.real - ft.real) ** 2).ravel())
            diffs.append(((fs.imag - ft.imag) ** 2).ravel())
    return float(np.concatenate(diffs).mean())


def test_spectral_loss_matches_numpy_fft_with_channel_pooling():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 4, 3, 5)), rng.normal(size=(2, 8, 3, 5))
    t_pooled = np.stack([t[:, 2 * k : 2 * k + 2].mean(axis=1) for k in range(4)], axis=1)  # 8 -> 4 channels
    got = spectral_loss(torch.from_numpy(s), torch.from_numpy(t))
    assert float(got) == pytest.approx(ref_spectral(s, t_pooled), rel=1e-5)


def test_spectral_loss_pools_larger_teacher_map_spatially():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 3, 3, 3)), rng.normal(size=(2, 3, 6, 6))
    t_small = t.reshape(2, 3, 3, 2, 3, 2).mean(axis=(3, 5))  # 2x2 average pooling
    got = spectral_loss(torch.from_numpy(s), torch.from_numpy(t))
    assert float(got) == pytest.approx(ref_spectral(s, t_small), rel=1e-5)
