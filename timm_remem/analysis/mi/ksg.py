"""The ``ksg`` estimator: Kraskov-Stoegbauer-Grassberger k-nearest-neighbour MI (estimator 1, max-norm), with
Ross (2014) for one discrete side; chunked exact distances, O(m^2 (d_a + d_b)) time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..._validation import check_float, check_int
from ...errors import ConfigError
from ._common import _auto_max_samples, _chunk_rows, _map_row_blocks, _resolve_max_samples, _standardize, _subsample
from ._plugin import _plugin_discrete

__all__ = ["estimate"]


def _max_norm_block(rows: torch.Tensor, cols_t: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Chebyshev distances between ``rows`` [c, d] and the columns of ``cols_t`` [d, n] into ``out`` [c, n]."""
    out.zero_()
    for j in range(rows.shape[1]):
        torch.sub(rows[:, j : j + 1], cols_t[j][None, :], out=tmp)
        tmp.abs_()
        torch.maximum(out, tmp, out=out)
    return out


def _ksg_prepare(x: torch.Tensor, opts: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    x = _standardize(x) if opts["standardize"] else x.to(torch.float64)
    noise = float(opts["noise"])
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
    return x.to(torch.float32)


def _ksg_continuous(x: torch.Tensor, y: torch.Tensor, k: int, chunk: int) -> float:
    """KSG estimator 1: ``psi(k) + psi(n) - <psi(n_x + 1) + psi(n_y + 1)>``."""
    n = x.shape[0]
    xt, yt = x.T.contiguous(), y.T.contiguous()
    n_x = torch.empty(n, dtype=torch.float64, device=x.device)
    n_y = torch.empty(n, dtype=torch.float64, device=x.device)

    def block(i0: int, i1: int) -> None:
        m = i1 - i0
        dx, dy, tmp = (torch.empty(m, n, device=x.device) for _ in range(3))
        _max_norm_block(x[i0:i1], xt, dx, tmp)
        _max_norm_block(y[i0:i1], yt, dy, tmp)
        diag = torch.arange(m, device=x.device)
        dx[diag, diag + i0] = math.inf
        dy[diag, diag + i0] = math.inf
        torch.maximum(dx, dy, out=tmp)
        eps = tmp.topk(k, dim=1, largest=False).values[:, -1:]
        n_x[i0:i1] = torch.count_nonzero(dx < eps, dim=1).to(torch.float64)
        n_y[i0:i1] = torch.count_nonzero(dy < eps, dim=1).to(torch.float64)

    _map_row_blocks(n, chunk, block, x.device)
    psi = torch.special.digamma
    k_t = torch.tensor(float(k), dtype=torch.float64)
    n_t = torch.tensor(float(n), dtype=torch.float64)
    return float(psi(k_t) + psi(n_t) - (psi(n_x + 1) + psi(n_y + 1)).mean())


def _ksg_mixed(x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int) -> float:
    """Ross (2014) discrete-continuous k-NN MI: ``psi(n) + <psi(k_i)> - <psi(N_y_i)> - <psi(m_i)>``."""
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    keep = counts[inv] > 1  # a class seen once has no neighbour of its own: drop it (as sklearn does)
    x, inv = x[keep], inv[keep]
    n = x.shape[0]
    if n < 2:
        return 0.0
    _, lab, counts = torch.unique(inv, return_inverse=True, return_counts=True)
    n_class = counts[lab]
    k_i = torch.minimum(n_class - 1, torch.full_like(n_class, k))
    kk = int(k_i.max())
    xt = x.T.contiguous()
    m_i = torch.empty(n, dtype=torch.float64, device=x.device)

    def block(i0: int, i1: int) -> None:
        m = i1 - i0
        dx, tmp = torch.empty(m, n, device=x.device), torch.empty(m, n, device=x.device)
        _max_norm_block(x[i0:i1], xt, dx, tmp)
        diag = torch.arange(m, device=x.device)
        dx[diag, diag + i0] = math.inf
        same = dx.masked_fill(lab[i0:i1, None] != lab[None, :], math.inf)
        radius = same.topk(kk, dim=1, largest=False).values.gather(1, (k_i[i0:i1] - 1)[:, None])
        m_i[i0:i1] = torch.count_nonzero(dx <= radius, dim=1).to(torch.float64)

    _map_row_blocks(n, chunk, block, x.device)
    psi = torch.special.digamma
    n_t = torch.tensor(float(n), dtype=torch.float64)
    return float(psi(n_t) + psi(k_i.to(torch.float64)).mean() - psi(n_class.to(torch.float64)).mean()
                 - psi(m_i).mean())


def estimate(a: torch.Tensor, b: torch.Tensor, a_discrete: bool, b_discrete: bool, options: dict[str, Any]) -> float:
    """KSG MI (nats); options ``k``, ``max_samples``, ``seed``, ``noise``, ``standardize``, ``chunk_size``.

    Example:
        >>> import torch
        >>> x = torch.randn(300, 1, generator=torch.Generator().manual_seed(0))
        >>> opts = {"k": 3, "max_samples": None, "seed": 0, "noise": 1e-6, "standardize": True, "chunk_size": None}
        >>> estimate(x, 2 * x, False, False, opts) > 3  # a deterministic relation: large MI
        True
    """
    da, db, opts = a_discrete, b_discrete, options
    k = check_int("k", opts["k"], low=1, hint="the number of neighbours")
    check_float("noise", opts["noise"], low=0, hint="the tie-breaking jitter in standard deviations")
    if da and db:
        return _plugin_discrete(a, b)
    n = a.shape[0]
    if n < k + 1:
        raise ConfigError(
            f"method='ksg' with k={k} needs at least k + 1 = {k + 1} samples; got n={n}. Pass more samples or a "
            "smaller `k`."
        )
    dims = (a.shape[1] if not da else 0) + (b.shape[1] if not db else 0)
    m = _resolve_max_samples(opts["max_samples"], n, lambda: _auto_max_samples("ksg", dims))
    if m < k + 1:
        raise ConfigError(f"`max_samples`={m} is below k + 1 = {k + 1}; raise it or lower `k`.")
    a, b = _subsample(a, b, m, opts["seed"])
    gen = torch.Generator().manual_seed(int(opts["seed"]) + 1)
    chunk = _chunk_rows(a.shape[0], opts["chunk_size"])
    if da or db:
        x, labels = (b, a) if da else (a, b)
        return _ksg_mixed(_ksg_prepare(x, opts, gen), labels, k, chunk)
    return _ksg_continuous(_ksg_prepare(a, opts, gen), _ksg_prepare(b, opts, gen), k, chunk)
