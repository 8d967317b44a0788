"""Exact running moments and the Gaussian (log-determinant) MI computed from them: the one-shot ``gaussian``
estimator and the streaming class both go through here, so streaming is exact.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError


class _Moments:
    """Exact running mean and centred scatter in float64 (Chan et al. pairwise update), optionally per class."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None  # sorted distinct labels seen
        self.class_counts: torch.Tensor | None = None
        self.class_sums: torch.Tensor | None = None

    def update(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        x = x.to(torch.float64)
        nb = x.shape[0]
        mean_b = x.mean(dim=0)
        xc = x - mean_b
        scatter_b = xc.T @ xc
        if self.n == 0:
            self.mean, self.scatter = mean_b, scatter_b
        else:
            delta = mean_b - self.mean
            total = self.n + nb
            self.scatter = self.scatter + scatter_b + torch.outer(delta, delta) * (self.n * nb / total)
            self.mean = self.mean + delta * (nb / total)
        self.n += nb
        if labels is not None:
            uniq, inv = torch.unique(labels, return_inverse=True)
            counts = torch.zeros(uniq.numel(), dtype=torch.float64, device=x.device).index_add_(
                0, inv, torch.ones(nb, dtype=torch.float64, device=x.device))
            sums = torch.zeros(uniq.numel(), x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, inv, x)
            if self.labels is not None:
                uniq = torch.cat([self.labels, uniq])
                counts = torch.cat([self.class_counts, counts])
                sums = torch.cat([self.class_sums, sums])
                uniq, inv = torch.unique(uniq, return_inverse=True)
                counts = torch.zeros(uniq.numel(), dtype=torch.float64, device=x.device).index_add_(0, inv, counts)
                sums = torch.zeros(uniq.numel(), x.shape[1], dtype=torch.float64, device=x.device).index_add_(
                    0, inv, sums)
            self.labels, self.class_counts, self.class_sums = uniq, counts, sums


def _logdet_spd(m: torch.Tensor) -> torch.Tensor:
    sign, logabs = torch.linalg.slogdet(m)
    if float(sign) <= 0:
        raise ConfigError(
            "the covariance matrix is not positive definite even after the ridge; increase `ridge` "
            "(e.g. ridge=1e-3) or remove duplicated/collinear feature columns."
        )
    return logabs


def _gaussian_from_moments(mom: _Moments, d_a: int | None, ridge: float) -> float:
    """MI from moments. ``d_a`` splits joint columns (continuous pair); ``None`` means labels are the other side."""
    n = mom.n
    var = mom.scatter.diagonal() / n
    # A column with zero variance is constant: it carries no information, so it is dropped.
    keep = var > (1e-12 * mom.mean.abs()).pow(2)
    std = var.clamp_min(0).sqrt()
    if d_a is not None:
        keep_a, keep_b = keep[:d_a], keep[d_a:]
        if not bool(keep_a.any()) or not bool(keep_b.any()):
            return 0.0
        std_k = std[keep]
        corr = mom.scatter[keep][:, keep] / n / torch.outer(std_k, std_k)
        corr = corr + ridge * torch.eye(corr.shape[0], dtype=corr.dtype, device=corr.device)
        ka = int(keep_a.sum())
        mi = 0.5 * (_logdet_spd(corr[:ka, :ka]) + _logdet_spd(corr[ka:, ka:]) - _logdet_spd(corr))
        return float(mi)
    if not bool(keep.any()):
        return 0.0
    centred = mom.class_sums / mom.class_counts[:, None] - mom.mean  # class mean minus overall mean
    between = (centred * mom.class_counts[:, None]).T @ centred
    within = mom.scatter - between
    std_k = std[keep]
    scale = torch.outer(std_k, std_k) * n
    eye = ridge * torch.eye(int(keep.sum()), dtype=std.dtype, device=std.device)
    total_c = mom.scatter[keep][:, keep] / scale + eye
    within_c = within[keep][:, keep] / scale + eye
    return float(0.5 * (_logdet_spd(total_c) - _logdet_spd(within_c)))


def _check_gaussian_n(n: int, d_a: int, d_b: int | None, n_classes: int = 0) -> None:
    need = (d_a + d_b + 2) if d_b is not None else (d_a + n_classes + 1)
    if n < need:
        what = f"d_a + d_b = {d_a + d_b}" if d_b is not None else f"d = {d_a} features and {n_classes} classes"
        raise ConfigError(
            f"method='gaussian' needs at least {need} samples for {what} (a full-rank covariance); got n={n}. "
            "Use more samples, reduce the feature dimension (e.g. PCA), or use method='renyi' or 'ksg'."
        )

