"""The functional estimator :func:`estimate_mi` (the streaming twin is
:class:`~timm_remem.analysis.mi.MutualInformation`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import binning, gaussian, ksg, renyi
from ._common import _as_samples, _check_pair, _cpu_workers, _resolve_options

__all__ = ["estimate_mi"]

_ESTIMATORS: dict[str, Callable[..., float]] = {
    "gaussian": gaussian.estimate,
    "ksg": ksg.estimate,
    "binning": binning.estimate,
    "renyi": renyi.estimate,
}


def estimate_mi(a: Any, b: Any, *, method: str = "ksg", **options: Any) -> float:
    """Estimate the mutual information I(a; b) in nats from paired samples.

    Args:
        a: ``[n, d_a]`` float features (``[n]`` float = one feature) or ``[n]`` integer labels (any integer or
            bool dtype is read as discrete). Torch tensor or NumPy array.
        b: The same for the other variable, with the same ``n`` rows in the same order.
        method: ``"ksg"`` (default), ``"gaussian"``, ``"binning"`` or ``"renyi"`` (see below).
        **options: Method options; an unknown name raises :class:`~timm_remem.errors.ConfigError`.

            - ``gaussian``: ``ridge=1e-6`` added to the correlation matrices.
            - ``ksg``: ``k=3`` neighbours; ``max_samples="auto"`` (int, ``"auto"`` or None = all); ``seed=0`` for
              the subsample and the jitter; ``noise=1e-6`` tie-breaking jitter in standard deviations;
              ``standardize=True``; ``chunk_size=None`` (rows per distance block, automatic).
            - ``binning``: ``bins=30`` per dimension; ``range=None`` (per-column min/max) or ``(low, high)``;
              ``correction=None`` or ``"miller-madow"``.
            - ``renyi``: ``alpha=2.0``; ``sigma="median"`` or a float; ``max_samples="auto"``; ``seed=0``;
              ``standardize=True``; ``chunk_size=None``.

    The methods' assumptions and biases are in docs/mi.md: ``gaussian`` is exact for jointly Gaussian data
    (needs ``n >= d_a + d_b + 2``, or ``n >= d + classes + 1`` with labels); ``ksg`` is assumption-free but biased
    down for large MI or many dimensions; ``binning`` is biased up; ``renyi`` is not Shannon MI (for ranking).
    Both sides discrete: the exact plug-in MI (``renyi``: its Renyi counterpart).

    Returns:
        The estimate in nats (small negative values are possible at independence).

    Raises:
        ConfigError: Unknown method or option, mismatched sample counts, NaN/inf features, too few samples for the
            method, or a shape other than ``[n, d]`` / ``[n]``.

    Example:
        >>> import math, torch
        >>> from timm_remem.analysis.mi import estimate_mi
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(5000, 1, generator=g)
        >>> y = 0.6 * x + 0.8 * torch.randn(5000, 1, generator=g)  # correlation 0.6
        >>> round(-0.5 * math.log(1 - 0.6 ** 2), 3)  # ground truth
        0.223
        >>> abs(estimate_mi(x, y, method="gaussian") - 0.223) < 0.04
        True
        >>> abs(estimate_mi(x, y, method="ksg") - 0.223) < 0.04
        True
    """
    opts = _resolve_options(method, options)
    a_t, da = _as_samples(a, "a")
    b_t, db = _as_samples(b, "b")
    _check_pair(a_t, b_t)
    b_t = b_t.to(a_t.device)
    with _cpu_workers():
        return _ESTIMATORS[method](a_t, b_t, da, db, opts)
