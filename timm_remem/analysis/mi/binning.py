"""The ``binning`` estimator: histogram plug-in MI, the classic of information-plane papers (Shwartz-Ziv & Tishby
2017).

Every continuous column is cut into ``bins`` equal-width bins over its own ``[min, max]`` (or over the fixed
``range=(low, high)`` given for all columns, e.g. ``(-1, 1)`` for tanh units); a row's tuple of bin indices
is its cell; labels are their own cells. ``I = H(A) + H(B) - H(A, B)`` of the empirical cell frequencies.
Exact for data that take one value per bin. Otherwise biased *upwards*: the plug-in bias is about
``(m_a - 1)(m_b - 1) / (2 n)`` for ``m`` occupied cells, and with many columns almost every sample gets a cell
of its own, so the estimate saturates at ``log n`` whatever the dependence (the compression artefact
discussed by Saxe et al. 2018). ``correction="miller-madow"`` adds ``(m_a + m_b - m_ab - 1) / (2 n)``, which
removes the first-order bias in the low-occupancy regime only. Invariant to increasing per-dimension affine
maps only up to rounding at bin edges.

Use it through :func:`~timm_remem.analysis.mi.estimate_mi` (``method="binning"``) or
:class:`~timm_remem.analysis.mi.MutualInformation`, which streams the cell counts exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError
from ._plugin import _bin_edges, _check_binning, _joint_codes, _plugin_discrete, _plugin_from_table, _table

__all__ = ["estimate"]


def estimate(a: torch.Tensor, b: torch.Tensor, a_discrete: bool, b_discrete: bool, options: dict[str, Any]) -> float:
    """Binning MI (nats) of samples already checked by :func:`~timm_remem.analysis.mi.estimate_mi`.

    The arguments are every estimator's (see :mod:`timm_remem.analysis.mi`); this one's options:
    ``bins``, ``range``, ``correction``.

    Example:
        >>> import math, torch
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> opts = {"bins": 2, "range": None, "correction": None}
        >>> abs(estimate(x, x, False, False, opts) - math.log(2)) < 1e-12  # two cells, equally full
        True
    """
    da, db, opts = a_discrete, b_discrete, options
    bins = _check_binning(opts)
    if da and db:
        return _plugin_discrete(a, b, opts["correction"])
    if a.shape[0] < 2:
        raise ConfigError(f"method='binning' needs at least 2 samples; got n={a.shape[0]}.")
    edges = [None if d else _bin_edges(x, opts["range"]) for x, d in ((a, da), (b, db))]
    d_a = 1 if da else a.shape[1]
    rows, counts = _table(_joint_codes(a, b, da, db, edges, bins))
    return _plugin_from_table(rows, counts, d_a, opts["correction"])
