"""The statistics of a study: Student-t confidence intervals over seeds, paired differences and their verdicts.

Written with :mod:`math` only (scipy is a test dependency). The t quantile inverts, by bisection, the exact
Student-t distribution function for integer degrees of freedom (Abramowitz and Stegun 26.7.3 and 26.7.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .._validation import check_float, check_int
from ..errors import ConfigError

__all__ = ["Interval", "t_cdf", "t_quantile", "mean_interval", "paired_interval", "verdict", "sharpness_verdict",
           "VERDICTS", "SHARPNESS_VERDICTS"]

#: The three verdicts a paired interval of accuracies can give.
VERDICTS = ("better", "worse", "no detectable difference at this N")
#: The three verdicts a paired interval of a sharpness measure can give (lower is flatter).
SHARPNESS_VERDICTS = ("flatter", "sharper", "no detectable difference at this N")


def t_cdf(t: float, df: int) -> float:
    """The distribution function ``P(T <= t)`` of Student's t with ``df`` (integer) degrees of freedom, exact.

    Example:
        >>> t_cdf(0.0, 5), round(t_cdf(1.0, 1), 6)
        (0.5, 0.75)
    """
    check_int("df", df, low=1)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    # A(t | df) = P(|T| <= t); odd df: 2/pi (theta + sin(theta) (cos + 2/3 cos^3 + ... + (2.4...(df-3))/(1.3...(df-2))
    # cos^(df-2))); even df: sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... + (1.3...(df-3))/(2.4...(df-2))
    # cos^(df-2))
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = 2.0 / math.pi * (theta + s * total)
    else:
        term, total = 1.0, 0.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = s * total
    a = min(max(a, 0.0), 1.0)
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_cdf`` inverted by bisection).

    Example:
        >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 30), 3)
        (12.706, 2.042)
    """
    check_float("p", p, low=0, high=1, low_open=True, high_open=True)
    check_int("df", df, low=1)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):  # far more than float64 needs; stops early once the bracket stops shrinking
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """A mean over seeds and its two-sided Student-t confidence interval.

    Attributes:
        mean: Sample mean.
        low: Lower end of the interval (``None`` with one value).
        high: Upper end of the interval (``None`` with one value).
        sd: Sample standard deviation (``n - 1`` in the denominator; ``None`` with one value).
        n: Number of values (seeds).
        confidence: Confidence level, e.g. 0.95.
    """

    mean: float
    low: float | None
    high: float | None
    sd: float | None
    n: int
    confidence: float

    @property
    def half_width(self) -> float | None:
        """Half the interval's width (``None`` without an interval)."""
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (adds ``half_width``)."""
        return asdict(self) | {"half_width": self.half_width}

    def format(self, digits: int = 4) -> str:
        """``mean ± half-width`` (``mean`` alone without an interval).

        Example:
            >>> Interval(0.5, 0.4, 0.6, 0.1, 3, 0.95).format()
            '0.5000 ± 0.1000'
        """
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def _values(name: str, values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ConfigError(f"{name}: no values; a mean needs at least one seed")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ConfigError(f"{name}: non-finite values {bad}; a run failed to produce a number, rerun it")
    return out


def mean_interval(values: Sequence[float], confidence: float = 0.95, *, name: str = "values") -> Interval:
    """Mean and two-sided Student-t interval ``mean ± t_{(1+c)/2, n-1} * sd / sqrt(n)``.

    With one value the interval is undefined: ``low``, ``high`` and ``sd`` are ``None``.

    Example:
        >>> iv = mean_interval([1.0, 2.0, 3.0, 4.0])
        >>> round(iv.low, 4), round(iv.high, 4)
        (0.4457, 4.5543)
    """
    check_float("confidence", confidence, low=0, high=1, low_open=True, high_open=True, hint="0.95 is usual")
    xs = _values(name, values)
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, None, None, n, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, confidence)


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, *,
                    name: str = "difference") -> Interval:
    """The interval of the mean paired difference ``a_i - b_i`` (same seeds on both sides).

    Example:
        >>> round(paired_interval([0.91, 0.93, 0.95], [0.90, 0.91, 0.92]).mean, 4)
        0.02
    """
    if len(a) != len(b):
        raise ConfigError(f"{name}: paired values need the same seeds on both sides, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], confidence, name=name)


def verdict(diff: Interval) -> str | None:
    """What a paired interval says: ``"better"`` (wholly above 0), ``"worse"`` (wholly below) or ``"no detectable
    difference at this N"`` (it contains 0); ``None`` without an interval (one seed).

    Example:
        >>> verdict(Interval(0.02, 0.01, 0.03, 0.01, 3, 0.95)), verdict(Interval(0.01, -0.01, 0.03, 0.02, 3, 0.95))
        ('better', 'no detectable difference at this N')
    """
    return _verdict(diff, *VERDICTS)


def sharpness_verdict(diff: Interval) -> str | None:
    """What a paired interval of a sharpness measure (arm minus ``plain``) says: ``"flatter"`` (wholly below 0),
    ``"sharper"`` (wholly above) or ``"no detectable difference at this N"``; ``None`` without an interval.

    Example:
        >>> sharpness_verdict(Interval(-0.02, -0.03, -0.01, 0.01, 3, 0.95))
        'flatter'
    """
    flatter, sharper, neither = SHARPNESS_VERDICTS
    return _verdict(diff, above=sharper, below=flatter, neither=neither)


def _verdict(diff: Interval, above: str, below: str, neither: str) -> str | None:
    if diff.low is None or diff.high is None:
        return None
    if diff.low > 0:
        return above
    return below if diff.high < 0 else neither
