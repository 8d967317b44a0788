"""Mutual-information estimators, one-shot (:func:`estimate_mi`) and streaming (:class:`MutualInformation`).

Every estimate is in nats. Inputs are ``[n, d]`` float features (a ``[n]`` float vector is one feature) or ``[n]``
integer labels (any integer or bool dtype means *discrete*; cast float labels with ``.long()``). Torch tensors and
NumPy arrays are accepted; estimation runs on the device of ``a``.

Methods (see :func:`estimate_mi` for the options of each):

- ``"gaussian"``: log-determinant formula, exact for jointly Gaussian data, a second-order summary otherwise.
- ``"ksg"`` (default): Kraskov-Stoegbauer-Grassberger k-nearest-neighbour estimator 1 (max-norm); with one discrete
  side, the Ross (2014) discrete-continuous variant.
- ``"binning"``: quantise every dimension, then the plug-in MI of the joint cell counts (the information-plane
  classic, biased upwards).
- ``"renyi"``: matrix-based Renyi alpha-order mutual information (Giraldo, Rao & Principe 2015) from Gram matrices,
  for high-dimensional features.

When *both* sides are discrete, ``gaussian``, ``ksg`` and ``binning`` all return the exact plug-in MI of the
empirical joint distribution; ``renyi`` returns its Renyi alpha-order counterpart.

Layout: one estimator per module (:mod:`.gaussian`, :mod:`.ksg`, :mod:`.binning`, :mod:`.renyi`), the functional
:func:`estimate_mi` (:mod:`.functional`) and its streaming twin :class:`MutualInformation` (:mod:`.streaming`);
the shared input checks, subsampling and CPU worker pool live in ``_common``.

Every estimator module has one function ``estimate(a, b, a_discrete, b_discrete, options) -> float`` (nats) for
samples that :func:`estimate_mi` already checked: ``a`` is ``[n, d_a]`` float features, or ``[n]`` int64 labels when
``a_discrete``; ``b`` the same for the other side, on ``a``'s device; ``options`` holds every option of the method.

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
