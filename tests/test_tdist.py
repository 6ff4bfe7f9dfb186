"""The project's one t quantile (collective/evaluate/tdist.py), held to scipy's."""

from __future__ import annotations

import math

import pytest

from collective.evaluate.tdist import incomplete_beta, t_cdf, t_critical, t_quantile

scipy_stats = pytest.importorskip("scipy.stats")

LEVELS = (0.5001, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995)


@pytest.mark.parametrize("level", LEVELS)
def test_the_t_quantile_matches_scipy_at_every_df_from_1_to_200(level):
    for df in range(1, 201):
        expected = float(scipy_stats.t.ppf(level, df))
        assert t_quantile(level, df) == pytest.approx(expected, abs=1e-6, rel=1e-9), (level, df)
        assert t_quantile(1.0 - level, df) == pytest.approx(-expected, abs=1e-6, rel=1e-9), (level, df)


@pytest.mark.parametrize("df", [0.5, 1.5, 2.5, 350.0, 1000.0, 1e5])
def test_fractional_and_large_df_match_scipy_too(df):
    for level in (0.9, 0.975, 0.999):
        assert t_quantile(level, df) == pytest.approx(float(scipy_stats.t.ppf(level, df)), abs=1e-6)


def test_the_cdf_and_the_incomplete_beta_match_scipy():
    from scipy.special import betainc

    for df in (1, 2, 3, 7, 30, 200):
        for t in (-40.0, -3.0, -0.5, 0.0, 1e-4, 0.7, 2.0, 12.0):
            assert t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), abs=1e-12)
    for a, b, x in ((0.5, 0.5, 0.3), (2.0, 5.0, 0.9), (100.0, 0.5, 0.99), (3.0, 3.0, 0.5)):
        assert incomplete_beta(a, b, x) == pytest.approx(float(betainc(a, b, x)), abs=1e-12)


def test_the_two_sided_critical_value_is_the_upper_quantile_and_none_below_one_df():
    assert t_critical(4) == pytest.approx(2.7764451051977987, abs=1e-9)  # the textbook 2.776
    assert t_critical(10, 0.9) == pytest.approx(float(scipy_stats.t.ppf(0.95, 10)), abs=1e-9)
    assert t_critical(math.inf) == pytest.approx(1.959963984540054, abs=1e-9)
    assert math.isnan(t_critical(0))
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
