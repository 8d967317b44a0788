"""The ``binning`` estimator: histogram plug-in MI, the classic of information-plane papers (Shwartz-Ziv & Tishby
2017). Biased upwards; ``correction="miller-madow"`` removes the first-order bias in the low-occupancy regime only.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError
from ._plugin import _bin_edges, _check_binning, _joint_codes, _plugin_discrete, _plugin_from_table, _table

__all__ = ["estimate"]


def estimate(a: torch.Tensor, b: torch.Tensor, a_discrete: bool, b_discrete: bool, options: dict[str, Any]) -> float:
    """Binning MI (nats); options ``bins``, ``range``, ``correction``.

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
