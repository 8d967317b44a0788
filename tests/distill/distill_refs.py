"""Independent references (numpy, explicit loops) and tiny models shared by the tests of timm_remem.distill."""

from __future__ import annotations

import numpy as np
import timm
import torch
import torch.nn as nn


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_kl_batchmean(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    """sum_i sum_c p_t log(p_t / p_s) / B, at temperature T, times T^2."""
    total = 0.0
    for i in range(s.shape[0]):
        log_ps = np_log_softmax(s[i] / temperature)
        log_pt = np_log_softmax(t[i] / temperature)
        for c in range(s.shape[1]):
            total += np.exp(log_pt[c]) * (log_pt[c] - log_ps[c])
    return temperature**2 * total / s.shape[0]


def ref_pearson(a: np.ndarray, b: np.ndarray) -> float:
    am, bm = a.mean(), b.mean()
    num = sum((x - am) * (y - bm) for x, y in zip(a, b, strict=True))
    den = np.sqrt(sum((x - am) ** 2 for x in a)) * np.sqrt(sum((y - bm) ** 2 for y in b))
    return num / den


def ref_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def ref_ce(s: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        log_p = np_log_softmax(s[i])
        total += (1 - smoothing) * -log_p[labels[i]] + smoothing * np.mean(-log_p)
    return total / s.shape[0]


def vit(num_classes=10, **kw):
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=num_classes, **kw).eval()


def resnet(num_classes=10):
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


class CallCounter:
    """Counts forward calls of a module and remembers the last input it received."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        self.last_input = None
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.last_input = args[0].detach().clone()


def make_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher float64 logits ``[6, 5]`` and integer labels ``[6]``, seeded."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2.0
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3.0
    y = torch.randint(0, 5, (6,), generator=g)
    return s, t, y
