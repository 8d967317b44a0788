"""Mutual-information estimators, one-shot (:func:`estimate_mi`) and streaming (:class:`MutualInformation`).

In nats, from ``[n, d]`` float features or ``[n]`` integer labels (docs/mi.md). One estimator per module
(``gaussian``, ``ksg``, ``binning``, ``renyi``), each with ``estimate(a, b, a_discrete, b_discrete, options) -> float``
for samples :func:`estimate_mi` already checked (``[n, d]`` float or ``[n]`` int64, on ``a``'s device).

Example:
    >>> import torch
    >>> from timm_remem.analysis.mi import MI_METHODS, estimate_mi
    >>> sorted(MI_METHODS)
    ['binning', 'gaussian', 'ksg', 'renyi']
    >>> labels = torch.arange(400) % 4
    >>> round(estimate_mi(labels, labels, method="binning"), 6) == round(float(torch.log(torch.tensor(4.0))), 6)
    True
"""

from ._common import MI_METHODS
from .functional import estimate_mi
from .streaming import MutualInformation

__all__ = ["MI_METHODS", "estimate_mi", "MutualInformation"]
