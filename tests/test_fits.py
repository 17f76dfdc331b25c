"""Fits and change points against closed forms and scipy."""
import numpy as np
import pytest
from scipy import optimize, stats

from lensdyn.fits import exponential_fit, line_fit, piecewise_constant_segments


def test_line_fit_matches_scipy_linregress_per_series():
    rng = np.random.default_rng(0)
    x = np.arange(12.0)
    y = 0.7 * x + 3.0 + rng.normal(size=(4, 12))
    fit = line_fit(x, y)
    for i in range(4):
        ref = stats.linregress(x, y[i])
        assert fit.slope[i] == pytest.approx(ref.slope, rel=1e-12)
        assert fit.intercept[i] == pytest.approx(ref.intercept, rel=1e-12)
        assert fit.slope_se[i] == pytest.approx(ref.stderr, rel=1e-10)
        assert fit.r2[i] == pytest.approx(ref.rvalue**2, rel=1e-10)


def test_exponential_fit_recovers_a_planted_rate_in_both_spaces():
    x = np.arange(20.0)
    y = np.exp(0.1288 * x + 0.5)
    for space in ("log", "linear"):
        fit = exponential_fit(x, y, space)
        assert fit.rate[0] == pytest.approx(0.1288, abs=1e-9)
        assert fit.intercept[0] == pytest.approx(0.5, abs=1e-8)
        assert fit.r2[0] == pytest.approx(1.0)


def test_linear_space_fit_equals_scipy_curve_fit_and_differs_from_the_log_fit():
    """With multiplicative noise the two spaces disagree; each must match its own reference."""
    rng = np.random.default_rng(1)
    x = np.arange(30.0)
    y = np.exp(0.1 * x) * np.exp(rng.normal(scale=0.3, size=30))
    linear = exponential_fit(x, y, "linear")
    (c, h), cov = optimize.curve_fit(lambda x, c, h: np.exp(c + h * x), x, y, p0=(0.0, 0.1))
    assert linear.rate[0] == pytest.approx(h, rel=1e-6)
    assert linear.intercept[0] == pytest.approx(c, abs=1e-5)
    assert linear.rate_se[0] == pytest.approx(np.sqrt(cov[1, 1]), rel=1e-4)
    log = exponential_fit(x, y, "log")
    assert log.rate[0] == pytest.approx(stats.linregress(x, np.log(y)).slope, rel=1e-12)
    assert abs(log.rate[0] - linear.rate[0]) > 1e-3


def test_exponential_fit_refuses_non_positive_values():
    with pytest.raises(ValueError, match="positive"):
        exponential_fit(np.arange(4.0), np.array([1.0, 0.0, 2.0, 3.0]))


def test_change_points_recover_planted_steps_in_most_draws_and_rarely_split_noise():
    """The MBIC rule is scale-free (sigma is estimated), so its error rates are properties of the rule:
    measured over 100 seeded draws, planted steps come back exactly in 95% and noise is split in 6%."""
    profile = np.concatenate([np.full(8, 2.0), np.full(12, 0.0), np.full(6, -1.5), [4.0]])
    exact = split_noise = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        exact += list(piecewise_constant_segments(profile + rng.normal(scale=0.1, size=profile.size))) == [0, 8, 20, 26]
        split_noise += len(piecewise_constant_segments(rng.normal(scale=0.1, size=30))) > 1
    assert exact >= 90
    assert split_noise <= 20


def test_change_points_of_a_noiseless_staircase_are_exact():
    assert list(piecewise_constant_segments(np.repeat([3.0, 1.0, 2.0], 5))) == [0, 5, 10]
    assert list(piecewise_constant_segments(np.ones(10))) == [0]
