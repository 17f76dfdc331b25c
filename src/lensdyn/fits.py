"""Curve fits, growth rates and change points shared by the analyses, vectorised over many series, in float64.

>>> x = np.arange(5.0)
>>> fit = exponential_fit(x, np.exp(0.3 * x + 1.0))
>>> round(float(fit.rate[0]), 6), round(float(fit.r2[0]), 6)
(0.3, 1.0)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from jaxtyping import Float, Int

FitSpace = Literal["log", "linear"]


@dataclass(frozen=True)
class LineFit:
    """``y = intercept + slope * x`` fitted to each series by ordinary least squares."""

    slope: Float[np.ndarray, " series"]
    intercept: Float[np.ndarray, " series"]
    slope_se: Float[np.ndarray, " series"]  # standard error of the slope (n - 2 degrees of freedom)
    r2: Float[np.ndarray, " series"]


@dataclass(frozen=True)
class ExponentialFit:
    """``y = exp(intercept + rate * x)`` per series; ``space`` says where the squared error was minimised."""

    rate: Float[np.ndarray, " series"]
    intercept: Float[np.ndarray, " series"]
    rate_se: Float[np.ndarray, " series"]
    r2: Float[np.ndarray, " series"]  # coefficient of determination in the fit's own space
    space: str


def hubble(a: Float[np.ndarray, " state"]) -> Float[np.ndarray, " block"]:
    """``H(l) = log a(l+1) - log a(l)``, the growth rate across block ``l`` of a scale factor ``a(l)``.

    Exact for ``a = exp(H0 l)``; one value per block. ``lensdyn.analyses.expansion`` reads it off
    the captured ``a(l)``, ``lensdyn.streaming.NormStats.hubble_rate`` off the streamed one.

    >>> hubble(np.exp(0.5 * np.arange(4))).round(12)
    array([0.5, 0.5, 0.5])
    """
    return np.diff(np.log(a))


def line_fit(x: Float[np.ndarray, " n"], y: Float[np.ndarray, "*series n"]) -> LineFit:
    """Closed-form OLS of every series on the same ``x``: ``slope = cov(x, y) / var(x)``.

    ``slope_se = sqrt(RSS / (n - 2) / sum (x - xbar)^2)``; ``r2 = 1 - RSS / TSS`` (1 for a constant series).

    >>> line_fit(np.arange(3.0), np.array([[1.0, 3.0, 5.0]])).slope
    array([2.])
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"a line fit with a standard error needs at least 3 points, got {n}")
    xc = x - x.mean()
    sxx = float(xc @ xc)
    y_mean = y.mean(axis=-1, keepdims=True)
    slope = (y - y_mean) @ xc / sxx
    intercept = y_mean[..., 0] - slope * x.mean()
    residual = y - (intercept[..., None] + slope[..., None] * x)
    rss = (residual**2).sum(axis=-1)
    tss = ((y - y_mean) ** 2).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(tss > 0, 1.0 - rss / tss, 1.0)
    return LineFit(slope=slope, intercept=intercept, slope_se=np.sqrt(rss / (n - 2) / sxx), r2=r2)


def exponential_fit(
    x: Float[np.ndarray, " n"], y: Float[np.ndarray, "*series n"], space: FitSpace = "log", iterations: int = 50
) -> ExponentialFit:
    """Fit ``y = exp(c + h x)`` to every series.

    ``space="log"``: OLS of ``log y`` on ``x`` (each point, e.g. each state, weighs the same, whatever its size).
    ``space="linear"``: least squares on ``y`` itself by Gauss-Newton from the log fit, which is
    what ``scipy.optimize.curve_fit`` does for one series; large values dominate it. The two
    differ whenever growth is not exactly exponential; the expansion write-up used one for its
    global ``H0`` and the other for its per-token constants, so lensdyn names the choice.

    >>> exponential_fit(np.arange(4.0), 2.0 ** np.arange(4.0), space="linear").rate.round(6)
    array([0.693147])
    """
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if (y <= 0).any() or not np.isfinite(y).all():
        raise ValueError("an exponential fit needs positive finite values")
    log_fit = line_fit(x, np.log(y))
    if space == "log":
        return ExponentialFit(log_fit.slope, log_fit.intercept, log_fit.slope_se, log_fit.r2, "log")
    if space != "linear":
        raise ValueError(f"space must be 'log' or 'linear', not {space!r}")
    x = np.asarray(x, dtype=np.float64)
    c, h = log_fit.intercept.copy(), log_fit.slope.copy()
    for _ in range(iterations):
        model = np.exp(c[..., None] + h[..., None] * x)
        # Jacobian columns: d model / dc = model, d model / dh = x * model; solve the 2x2 normal equations.
        r = y - model
        a11, a12, a22 = (model**2).sum(-1), (x * model**2).sum(-1), (x**2 * model**2).sum(-1)
        b1, b2 = (model * r).sum(-1), (x * model * r).sum(-1)
        det = a11 * a22 - a12**2
        dc, dh = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
        c, h = c + dc, h + dh
        if np.all(np.abs(dh) <= 1e-12 * np.maximum(1.0, np.abs(h))):
            break
    model = np.exp(c[..., None] + h[..., None] * x)
    rss = ((y - model) ** 2).sum(-1)
    tss = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
    n = x.shape[0]
    a11, a12, a22 = (model**2).sum(-1), (x * model**2).sum(-1), (x**2 * model**2).sum(-1)
    rate_var = rss / (n - 2) * a11 / (a11 * a22 - a12**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(tss > 0, 1.0 - rss / tss, 1.0)
    return ExponentialFit(rate=h, intercept=c, rate_se=np.sqrt(rate_var), r2=r2, space="linear")


def piecewise_constant_segments(values: Float[np.ndarray, " n"], max_segments: int = 6) -> Int[np.ndarray, " boundary"]:
    """Change points of a profile: the least-squares piecewise-constant fit with the lowest Schwarz criterion.

    For each ``k = 1..max_segments`` dynamic programming finds the exact best split into ``k``
    contiguous segments (residual sum of squares ``RSS_k``); the chosen ``k`` minimises
    ``RSS_k / sigma^2 + 3 (k - 1) log n`` (the MBIC penalty of R's ``changepoint`` package, which
    plain BIC's ``log n`` per change point over-segments noise under), with the noise level
    estimated robustly from first differences,
    ``sigma = median(|diff v|) / (0.6745 sqrt 2)`` (differences of a piecewise-constant signal
    are zero but at its steps, so steps do not inflate it).
    Returns the start index of every segment (the first is 0).

    >>> piecewise_constant_segments(np.array([1.0, 1.1, 0.9, 1.0, 5.0, 5.1, 4.9, 5.0, 2.0, 2.1, 1.9, 2.0]))
    array([0, 4, 8])
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    if n == 0:
        raise ValueError("cannot segment an empty profile")
    if n < 3:
        return np.array([0], dtype=np.int64)
    k_max = min(max_segments, n)
    csum, csum2 = np.concatenate([[0.0], np.cumsum(v)]), np.concatenate([[0.0], np.cumsum(v**2)])

    def cost(i: int, j: int) -> float:  # RSS of v[i:j] around its mean
        s, m = csum[j] - csum[i], j - i
        return max(csum2[j] - csum2[i] - s * s / m, 0.0)

    best = np.full((k_max + 1, n + 1), np.inf)
    start = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(k, n + 1):
            options = [best[k - 1, i] + cost(i, j) for i in range(k - 1, j)]
            i_best = int(np.argmin(options))
            best[k, j], start[k, j] = options[i_best], i_best + k - 1
    diffs = np.diff(v)
    sigma = np.median(np.abs(diffs)) / (0.6745 * np.sqrt(2.0))
    # A noiseless profile has sigma 0: floor it far below any step that matters.
    sigma = max(sigma, 1e-6 * max(float(np.ptp(v)), 1e-12))
    score = [best[k, n] / sigma**2 + 3 * (k - 1) * np.log(n) for k in range(1, k_max + 1)]
    k = int(np.argmin(score)) + 1
    starts, j = [], n
    for kk in range(k, 0, -1):
        j = int(start[kk, j])
        starts.append(j)
    return np.array(sorted(starts), dtype=np.int64)
