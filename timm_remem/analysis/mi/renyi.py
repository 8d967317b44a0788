"""The ``renyi`` estimator: matrix-based Renyi alpha-order MI (Giraldo, Rao & Principe 2015), for ranking
high-dimensional features; ``I_alpha = S(A) + S(B) - S(A o B / tr(A o B))`` of normalised Gram matrices.

Kernel width (ours): columns z-scored, ``sigma`` the median pairwise distance among (up to) the first 1,000
subsampled rows. ``alpha=2`` needs no eigendecomposition (``sum lambda^2`` is the squared Frobenius norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ...errors import ConfigError
from ._common import (
    _auto_max_samples,
    _chunk_rows,
    _map_row_blocks,
    _parallel_map,
    _resolve_max_samples,
    _standardize,
    _subsample,
)

__all__ = ["estimate"]


def _sq_dists(rows: torch.Tensor, x: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    d = sq_norms[rows][:, None] + sq_norms[None, :] - 2.0 * (x[rows] @ x.T)
    return d.clamp_(min=0)


def _median_sigma(x: torch.Tensor) -> float:
    m = min(x.shape[0], 1000)
    xs = x[:m]
    d = torch.cdist(xs, xs)
    iu = torch.triu_indices(m, m, offset=1, device=x.device)
    vals = d[iu[0], iu[1]]
    vals = vals[vals > 0]
    return float(vals.median()) if vals.numel() else 1.0


def _renyi_kernel(x: torch.Tensor, discrete: bool, sigma: Any, standardize: bool) -> Callable[[slice], torch.Tensor]:
    """Return ``rows -> K[rows, :]`` (float64) of the Gram matrix with unit diagonal."""
    if discrete:
        return lambda rows: (x[rows][:, None] == x[None, :]).to(torch.float64)
    z = _standardize(x) if standardize else x.to(torch.float64)
    s = _median_sigma(z) if isinstance(sigma, str) and sigma == "median" else sigma
    if isinstance(s, str) or not float(s) > 0:
        raise ConfigError(f"`sigma` must be 'median' or a positive float; got {sigma!r}.")
    s = float(s)
    sq = z.pow(2).sum(dim=1)
    gamma = 1.0 / (2.0 * s * s)
    return lambda rows: torch.exp(-gamma * _sq_dists(rows, z, sq))


def estimate(a: torch.Tensor, b: torch.Tensor, a_discrete: bool, b_discrete: bool, options: dict[str, Any]) -> float:
    """Matrix-based Renyi MI (nats); options ``alpha``, ``sigma``, ``max_samples``, ``seed``, ``standardize``,
    ``chunk_size``.

    Example:
        >>> import math, torch
        >>> y = torch.tensor([0, 0, 1, 1])
        >>> opts = {"alpha": 2.0, "sigma": "median", "max_samples": None, "seed": 0, "standardize": True,
        ...         "chunk_size": None}
        >>> abs(estimate(y, y, True, True, opts) - math.log(2)) < 1e-12  # I_2(y; y): the order-2 entropy of y
        True
    """
    da, db, opts = a_discrete, b_discrete, options
    alpha = float(opts["alpha"])
    if not alpha > 0 or alpha == 1:
        raise ConfigError(f"`alpha` must be > 0 and != 1 (use e.g. 1.01 to approach Shannon); got {opts['alpha']!r}.")
    n = a.shape[0]
    if n < 4:
        raise ConfigError(f"method='renyi' needs at least 4 samples; got n={n}.")
    dims = (a.shape[1] if not da else 1) + (b.shape[1] if not db else 1)
    m = _resolve_max_samples(opts["max_samples"], n, lambda: _auto_max_samples("renyi", dims, alpha))
    m = max(m, 4)
    a, b = _subsample(a, b, m, opts["seed"])
    m = a.shape[0]
    ka = _renyi_kernel(a, da, opts["sigma"], opts["standardize"])
    kb = _renyi_kernel(b, db, opts["sigma"], opts["standardize"])
    if alpha == 2.0:
        def block(i0: int, i1: int) -> torch.Tensor:
            ga, gb = ka(slice(i0, i1)), kb(slice(i0, i1))
            return torch.stack([ga.pow(2).sum(), gb.pow(2).sum(), (ga * gb).pow(2).sum()])

        chunk = _chunk_rows(m, opts["chunk_size"])
        s_a, s_b, s_ab = torch.stack(_map_row_blocks(m, chunk, block, a.device)).sum(dim=0)
        # S_2(K / m) = -log(sum K^2 / m^2); the Hadamard product also has unit diagonal, so trace m.
        return float(torch.log(s_ab) + 2.0 * math.log(m) - torch.log(s_a) - torch.log(s_b))
    full = slice(0, m)
    ga, gb = ka(full), kb(full)

    def entropy(g: torch.Tensor) -> torch.Tensor:
        lam = torch.linalg.eigvalsh(g / m).clamp_(min=0)
        return torch.log(lam.pow(alpha).sum()) / (1.0 - alpha)

    s_a, s_b, s_ab = _parallel_map(entropy, [(ga,), (gb,), (ga * gb,)], a.device)
    return float(s_a + s_b - s_ab)
