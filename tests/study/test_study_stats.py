"""The study's statistics against scipy: the Student-t distribution and quantile, mean and paired intervals, and
the verdicts that follow from them."""

from __future__ import annotations

import math

import pytest
import scipy.stats

from timm_remem.errors import ConfigError
from timm_remem.study import (
    Interval,
    mean_interval,
    paired_interval,
    sharpness_verdict,
    t_cdf,
    t_quantile,
    verdict,
)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 19, 30, 61])
@pytest.mark.parametrize("p", [0.001, 0.025, 0.1, 0.5, 0.8, 0.95, 0.975, 0.995, 0.9995])
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(float(scipy.stats.t.ppf(p, df)), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("df", [1, 2, 3, 6, 11, 40])
@pytest.mark.parametrize("t", [-25.0, -2.0, -0.3, 0.0, 0.7, 1.96, 12.7, math.inf])
def test_t_cdf_matches_scipy(t, df):
    assert t_cdf(t, df) == pytest.approx(float(scipy.stats.t.cdf(t, df)), abs=1e-12)


@pytest.mark.parametrize("values", [[0.9, 0.92], [0.81, 0.85, 0.8], [1.0, 2.0, 4.0, 8.0, 16.0]])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_mean_interval_matches_scipys_t_interval(values, confidence):
    n = len(values)
    low, high = scipy.stats.t.interval(confidence, n - 1, loc=sum(values) / n, scale=scipy.stats.sem(values))
    iv = mean_interval(values, confidence)
    assert (iv.low, iv.high) == (pytest.approx(low, abs=1e-10), pytest.approx(high, abs=1e-10))
    assert iv.sd == pytest.approx(float(scipy.stats.tstd(values)), abs=1e-12)


def test_paired_interval_is_the_interval_of_the_differences():
    a, b = [0.91, 0.95, 0.93, 0.90], [0.90, 0.92, 0.93, 0.88]
    d = [x - y for x, y in zip(a, b, strict=True)]
    low, high = scipy.stats.t.interval(0.95, 3, loc=sum(d) / 4, scale=scipy.stats.sem(d))
    iv = paired_interval(a, b)
    assert iv.low == pytest.approx(low, abs=1e-12) and iv.high == pytest.approx(high, abs=1e-12)
    # the same p-value view: 0 lies outside the interval exactly when ttest_rel rejects at 5%
    assert (iv.low > 0 or iv.high < 0) == (scipy.stats.ttest_rel(a, b).pvalue < 0.05)


def test_one_value_has_no_interval():
    iv = mean_interval([0.5])
    assert (iv.mean, iv.low, iv.high, iv.sd, iv.half_width) == (0.5, None, None, None, None)
    assert verdict(iv) is None and iv.format() == "0.5000"


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0.001, 0.02, "better"), (-0.03, -0.0001, "worse"), (-0.01, 0.02, "no detectable difference at this N"),
    (0.0, 0.02, "no detectable difference at this N"),
])
def test_verdict_follows_the_interval(low, high, expected):
    assert verdict(Interval((low + high) / 2, low, high, 0.01, 3, 0.95)) == expected


@pytest.mark.parametrize(("low", "high", "expected"), [
    (-0.02, -0.001, "flatter"), (0.001, 0.03, "sharper"), (-0.01, 0.02, "no detectable difference at this N"),
    (-0.02, 0.0, "no detectable difference at this N"),
])
def test_sharpness_verdict_follows_the_interval_lower_is_flatter(low, high, expected):
    assert sharpness_verdict(Interval((low + high) / 2, low, high, 0.01, 3, 0.95)) == expected


def test_sharpness_verdict_agrees_with_a_one_sided_reading_of_ttest_rel():
    arm, plain = [0.10, 0.12, 0.11, 0.09], [0.15, 0.16, 0.18, 0.14]
    iv = paired_interval(arm, plain)
    assert sharpness_verdict(iv) == "flatter"
    result = scipy.stats.ttest_rel(arm, plain)
    assert result.pvalue < 0.05 and result.statistic < 0
    assert sharpness_verdict(mean_interval([0.5])) is None


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"non-finite values \[nan\]"):
        mean_interval([0.5, float("nan")])
    with pytest.raises(ConfigError, match="same seeds on both sides, got 2 and 3"):
        paired_interval([1, 2], [1, 2, 3])
    with pytest.raises(ConfigError, match="confidence"):
        mean_interval([1, 2], 1.5)
