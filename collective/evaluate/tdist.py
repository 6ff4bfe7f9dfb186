"""Student's t distribution: its CDF and its quantile, the project's one t function.

scipy is only a development dependency, so the t quantile is computed here: the CDF from the
regularized incomplete beta function (continued fraction, modified Lentz; Numerical Recipes
6.4), and the quantile by bracketing and bisecting that CDF to float precision. Every t
interval of the project (`compare.mean_ci`, the paired comparison of sweep cells, the
benchmarks' summaries) takes its quantile from `t_quantile`; tests/test_tdist.py holds it
to scipy.stats.t.ppf.
"""

from __future__ import annotations

import math
from statistics import NormalDist

_TINY = 1e-300
_EPS = 1e-15
_MAX_TERMS = 10_000


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + numerator / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float, one_minus_x: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1.
    `one_minus_x`: 1 - x where the caller has it without cancellation."""
    y = 1.0 - x if one_minus_x is None else one_minus_x
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, y) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    square = t * t
    # P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2); 1 - x = t^2/(df+t^2) kept exact near t = 0
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + square), square / (df + square))
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (df = inf: the
    normal's); NaN for df < 1 is not given: df must be > 0. Accurate to about 1e-12 relative."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if math.isinf(df):
        return NormalDist().inv_cdf(probability)
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def t_critical(df: float, confidence: float = 0.95) -> float:
    """The two-sided critical value: the half-width of a `confidence` t interval is this times
    the standard error. NaN for df < 1 (no spread to estimate)."""
    if not df >= 1:
        return math.nan
    return t_quantile(0.5 + confidence / 2.0, df)


__all__ = ["incomplete_beta", "t_cdf", "t_critical", "t_quantile"]
