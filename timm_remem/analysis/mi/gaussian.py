"""The ``gaussian`` estimator: log-determinant MI, exact for jointly Gaussian data.

Continuous pair: ``I = 0.5 * (logdet S_a + logdet S_b - logdet S_ab)`` with the sample covariances, computed on
the correlation matrices (identical in exact arithmetic) plus ``ridge * I``. Exact for jointly Gaussian data;
for other data it is the MI of the Gaussian with the same covariance (it sees linear dependence only, and
can under- or over-estimate). Exactly invariant to per-dimension affine maps ``x -> s * x + t`` (``s != 0``)
because the ridge is added to the correlation matrix. Finite-sample bias is upward, about
``d_a * d_b / (2 n)`` nats. The ridge caps the MI of a deterministic relation at about
``0.5 * log(1 / (2 * ridge))`` nats per dimension (6.6 nats for the default 1e-6). Constant columns are
dropped (they carry no information).

One discrete side (labels ``y``): ``I = 0.5 * (logdet S_total - logdet S_within)`` with the pooled
within-class covariance, the MI of a mixture of Gaussians with shared covariance under a Gaussian
approximation of the mixture. It is an upper bound on the true MI when the class-conditionals are Gaussian
with shared covariance (a Gaussian has the largest entropy for its covariance) and tight when the classes
overlap strongly. Both sides discrete: the plug-in MI.

Use it through :func:`~timm_remem.analysis.mi.estimate_mi` (``method="gaussian"``) or
:class:`~timm_remem.analysis.mi.MutualInformation`, which streams it exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..._validation import check_float
from ._moments import _check_gaussian_n, _gaussian_from_moments, _Moments
from ._plugin import _plugin_discrete

__all__ = ["estimate"]


def estimate(a: torch.Tensor, b: torch.Tensor, a_discrete: bool, b_discrete: bool, options: dict[str, Any]) -> float:
    """Gaussian MI (nats) of samples already checked by :func:`~timm_remem.analysis.mi.estimate_mi`.

    The arguments are every estimator's (see :mod:`timm_remem.analysis.mi`); this one's options: ``{"ridge": 1e-6}``.

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
