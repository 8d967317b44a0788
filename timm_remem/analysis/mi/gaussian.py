"""The ``gaussian`` estimator: log-determinant MI on the correlation matrices (plus ``ridge * I``), exact for
jointly Gaussian data; with labels, ``0.5 * (logdet S_total - logdet S_within)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..._validation import check_float
from ._moments import _check_gaussian_n, _gaussian_from_moments, _Moments
from ._plugin import _plugin_discrete

__all__ = ["estimate"]


def estimate(a: torch.Tensor, b: torch.Tensor, a_discrete: bool, b_discrete: bool, options: dict[str, Any]) -> float:
    """Gaussian MI (nats); option ``ridge``.

    Example:
        >>> import math, torch
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
        >>> y = torch.tensor([[0.0], [2.0], [1.0], [3.0]], dtype=torch.float64)  # correlation 0.8
        >>> round(estimate(x, y, False, False, {"ridge": 0.0}), 6) == round(-0.5 * math.log(1 - 0.8**2), 6)
        True
    """
    da, db = a_discrete, b_discrete
    ridge = check_float("ridge", options["ridge"], low=0, hint="it is added to the correlation matrices")
    if da and db:
        return _plugin_discrete(a, b)
    if da:
        a, b, da, db = b, a, db, da
    mom = _Moments()
    if db:
        n_classes = int(torch.unique(b).numel())
        _check_gaussian_n(a.shape[0], a.shape[1], None, n_classes)
        mom.update(a, b)
        return _gaussian_from_moments(mom, None, ridge)
    _check_gaussian_n(a.shape[0], a.shape[1], b.shape[1])
    mom.update(torch.cat([a.to(torch.float64), b.to(torch.float64)], dim=1))
    return _gaussian_from_moments(mom, a.shape[1], ridge)
