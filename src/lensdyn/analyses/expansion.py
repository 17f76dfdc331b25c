"""Residual-stream expansion: the FLRW-style write-up's claims, each with the test it never ran.

The write-up (Qwen3-4B, 512 tokens of one text) reads the growth of token norms through the
blocks as a cosmological scale factor. lensdyn measures every quantity it names, on any model,
under the state convention of ``lensdyn.conventions`` (state ``n_layers`` is the last block's
output *before* the final norm, so the write-up's "final contraction", read off the post-norm output, is not a state here).

Definitions (``n_lt`` is the norm of token ``t`` at state ``l``; tokens are the capture's mask):

- norms: Euclidean ``||h||_2`` and causal ``||h||_M`` under both causal metrics of
  ``lensdyn.metric``: ``causal_inverse`` (``M = Cov(gamma)^-1``, the write-up's; the track
  ``causal``) and ``causal_dual`` (``M = Cov(gamma)``, Park et al.'s product for residual states;
  the track ``causal_dual``). The write-up's claims that read the causal norm are judged under each.
- scale factor ``a(l) = mean_t n_lt / mean_t n_0t`` (ratio of means; ``"mean_of_ratios"``
  averages ``n_lt / n_0t`` instead), so ``a(0) = 1``.
- Hubble rate ``H(l) = log a(l+1) - log a(l)``: the growth rate across block ``l`` (exact for
  ``a = exp(H0 l)``; one value per block). Its epochs (the write-up's inflation, deceleration,
  re-acceleration) are found by the change-point rule of ``lensdyn.fits``, not by eye:
  ``hubble_epoch_starts`` and the mean rate of each, ``hubble_epoch_rates``.
- ``h0``: the rate of ``a(l) = exp(c + H0 l)`` fitted over all states, with its standard error
  and ``r2``, in log space (OLS on ``log a``) or linear space (least squares on ``a``).
- per-token ``H``: the same fit to each token's own ``n_lt``; its mean, std, CV, and Spearman
  correlation with position.
- comoving coordinates: ``n_lt / a(l)``. ``physical_cv`` is the mean over tokens of the
  coefficient of variation (std / mean over states) of ``n_lt``; ``comoving_cv`` the same of
  ``n_lt / a(l)``; ``cv_reduction = 1 - comoving_cv / physical_cv``. Dividing by the per-state mean
  removes most of the variation of *any* set of growing numbers, so ``cv_reduction_null`` repeats
  the computation after permuting tokens independently within each state (token identity across
  states destroyed, every state's distribution kept). Only a reduction beyond the null says
  tokens keep their comoving norm.
- ``post_ln_norms``: mean norm of what attention reads (``attn_in``: the pre-attention norm's
  output with its gain), per block: the write-up's "LayerNorm artifact" test.
- metric shape: per-state covariance ``C_l`` of the residual (centred, float64); overlap of top-k
  eigenvector subspaces ``||U_i^T U_j||_F^2 / k``; eigenvalue growth ``lambda_k(l) / lambda_k(0)``
  against ``a(l)^2``; variance growth along the fixed state-0 eigendirections against ``a(l)^2``
  (all ones if expansion is isotropic); participation ratio ``(sum lambda)^2 / sum lambda^2``
  (``d_model`` for a Euclidean-isotropic cloud) and condition number of ``C_0``.
- growth per sublayer: ``||h + d||^2 - ||h||^2 = 2 h.d + ||d||^2`` for the residual ``h`` a
  sublayer output ``d`` is added to; ``attn_share`` is attention's part of the summed growth.
- redshift ``z(l1 -> l2) = a(l2) / a(l1) - 1``.

>>> model = ld.load_model("smollm2-135m")                 # doctest: +SKIP
>>> result = expansion.measure(model, "diverse")          # doctest: +SKIP
>>> print(result.summary())                               # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from lensdyn import citations, plots
from lensdyn.errors import ArgumentError
from lensdyn.fits import ExponentialFit, FitSpace, exponential_fit, hubble, piecewise_constant_segments
from lensdyn.hooks.capture import Capture
from lensdyn.hooks.circuits import model_causal_metric
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.metric import METRIC_FORMULAS, CausalMetric, metric_norms
from lensdyn.ops import AGGREGATIONS, aggregate_ratio, to_numpy, token_norms
from lensdyn.resampling import CovarianceMoments, prompt_counts, prompt_sums, resampled_tokens
from lensdyn.results import Conventions, Provenance, Result, transient
from lensdyn.verdicts import Claim, finite

STREAMS = ("resid", "resid_mid", "attn_in", "attn_out", "mlp_out")


# --- pure functions of tensors -------------------------------------------------------------


def scale_factor(norms: Float[Tensor, "state token"], aggregation: str = "ratio_of_means") -> Float[np.ndarray, " state"]:
    """``a(l)``: how much larger norms are at state ``l`` than at state 0.

    >>> scale_factor(torch.tensor([[1., 3.], [2., 6.], [4., 12.]]))
    array([1., 2., 4.])
    """
    return to_numpy(aggregate_ratio(norms, norms[:1].expand_as(norms), aggregation))


def fit_h0(a: Float[np.ndarray, " state"], space: FitSpace = "log") -> ExponentialFit:
    """Fit ``a(l) = exp(c + H0 l)`` over every state (one series).

    >>> round(float(fit_h0(np.exp(0.1 * np.arange(10))).rate[0]), 9)
    0.1
    """
    return exponential_fit(np.arange(len(a), dtype=np.float64), a[None, :], space)


def per_token_h(norms: Float[Tensor, "state token"], space: FitSpace = "log") -> Float[np.ndarray, " token"]:
    """Each token's own rate: the fit of ``n_lt = exp(c_t + H_t l)`` over states.

    >>> per_token_h(torch.exp(torch.outer(torch.arange(5.), torch.tensor([0.1, 0.3])))).round(6)
    array([0.1, 0.3])
    """
    values = to_numpy(norms.to(torch.float64))
    return exponential_fit(np.arange(values.shape[0], dtype=np.float64), values.T, space).rate


def trajectory_cv(values: Float[Tensor, "state token"]) -> float:
    """Mean over tokens of ``std_l / mean_l`` of each token's trajectory (population std).

    >>> trajectory_cv(torch.tensor([[1., 5.], [3., 5.]]))      # token 0: CV 0.5; token 1: 0
    0.25
    """
    return float(_trajectory_cvs(values))


def _trajectory_cvs(values: Float[Tensor, "*batch state token"]) -> Float[Tensor, "*batch"]:
    v = values.to(torch.float64)
    return (v.std(dim=-2, correction=0) / v.mean(dim=-2)).mean(dim=-1)


def comoving_cv(norms: Float[Tensor, "state token"], aggregation: str = "ratio_of_means") -> tuple[float, float, float]:
    """``(physical_cv, comoving_cv, cv_reduction)`` with ``a(l)`` taken from the same norms.

    >>> comoving_cv(torch.tensor([[1., 2.], [10., 20.]]))      # pure expansion: comoving CV 0
    (0.8181818181818182, 0.0, 1.0)
    """
    physical, comoving, reduction = _comoving_cvs(norms[None].to(torch.float64), aggregation)
    return float(physical[0]), float(comoving[0]), float(reduction[0])


def _comoving_cvs(norms: Float[Tensor, "batch state token"], aggregation: str) -> tuple[Tensor, Tensor, Tensor]:
    """``comoving_cv`` of each of a batch of ``[state, token]`` norm matrices (a(l) of each its own)."""
    batch, states, tokens = norms.shape
    first = norms[:, :1].expand_as(norms)
    a = aggregate_ratio(norms.reshape(-1, tokens), first.reshape(-1, tokens), aggregation).reshape(batch, states)
    physical = _trajectory_cvs(norms)
    comoving = _trajectory_cvs(norms / a[:, :, None])
    return physical, comoving, 1.0 - comoving / physical


NULL_BATCH = 64  # permutations drawn and reduced together (memory: NULL_BATCH x state x token float64)


def cv_reduction_null(
    norms: Float[Tensor, "state token"], aggregation: str = "ratio_of_means", n_permutations: int = 400, seed: int = 0
) -> Float[np.ndarray, " permutation"]:
    """``cv_reduction`` after permuting tokens independently within each state, ``n_permutations`` times.

    Each state keeps its distribution of norms (so ``a(l)`` is unchanged under ratio of means);
    only the identity of a token across states is lost.
    """
    return cv_reduction_nulls([norms], aggregation, n_permutations, seed)[0]


def cv_reduction_nulls(
    norms: Sequence[Float[Tensor, "state token"]], aggregation: str = "ratio_of_means", n_permutations: int = 400,
    seed: int = 0,
) -> list[Float[np.ndarray, " permutation"]]:
    """``cv_reduction_null`` of each of several ``[state, token]`` norm matrices of one shape (one per metric), under
    the same permutations: drawing them is a third of the null's work, so they are drawn once.
    """
    rng = np.random.default_rng(seed)
    values = [to_numpy(n.to(torch.float64)) for n in norms]
    states, tokens = values[0].shape
    out = [[] for _ in values]  # 0 draws: a resample, judged against the data's null
    for start in range(0, n_permutations, NULL_BATCH):  # permutations in batches: a few array operations each
        size = min(NULL_BATCH, n_permutations - start)
        # rng.permuted lays its copy out [state][token][permutation]; each batch is gathered in that layout too, so
        # the reductions below sum in the order they do on a permuted copy of the values themselves.
        order = rng.permuted(np.broadcast_to(np.arange(tokens), (size, states, tokens)), axis=2)
        flat = np.ascontiguousarray(order.transpose(1, 2, 0)).reshape(states, tokens * size)
        for drawn, v in zip(out, values):
            batch = np.take_along_axis(v, flat, axis=1).reshape(states, tokens, size).transpose(2, 0, 1)
            drawn.append(to_numpy(_comoving_cvs(torch.from_numpy(batch), aggregation)[2]))
    return [np.concatenate(drawn) if drawn else np.empty(0) for drawn in out]


def growth_terms(
    h: Float[Tensor, "*lead d_model"], d: Float[Tensor, "*lead d_model"]
) -> tuple[Float[Tensor, "*lead"], Float[Tensor, "*lead"]]:
    """``(2 h.d, ||d||^2)``: the two terms of ``||h + d||^2 - ||h||^2``, in float64.

    >>> growth_terms(torch.tensor([3., 0.]), torch.tensor([1., 1.]))
    (tensor(6., dtype=torch.float64), tensor(2., dtype=torch.float64))
    """
    # Dot products in the activations' dtype (one pass, no float64 copies); float64 from here on.
    cross = 2.0 * torch.linalg.vecdot(h, d).to(torch.float64)
    return cross, torch.linalg.vecdot(d, d).to(torch.float64)


def redshift(a: Float[np.ndarray, " state"], l1: int, l2: int) -> float:
    """``z(l1 -> l2) = a(l2) / a(l1) - 1``: how much a vector written at ``l1`` is outgrown by ``l2``.

    >>> redshift(np.array([1.0, 2.0, 8.0]), 1, 2)
    3.0
    """
    return float(a[l2] / a[l1] - 1.0)


def redshift_table(a: Float[np.ndarray, " state"]) -> Float[np.ndarray, "state state"]:
    """``z[l1, l2]`` for every pair of states.

    >>> redshift_table(np.array([1.0, 2.0]))
    array([[ 0. ,  1. ],
           [-0.5,  0. ]])
    """
    return a[None, :] / a[:, None] - 1.0


@dataclass(frozen=True)
class CovarianceShape:
    """Shape of the residual covariance across states (see the module docstring).

    ``rank`` counts eigenvalues above ``RANK_TOLERANCE * lambda_max``; the condition number and
    the state-0 directions use only those (embeddings of a few hundred distinct tokens span fewer
    than ``d_model`` directions, and a zero-variance direction has no growth ratio).
    """

    top_eigenvalues: Float[np.ndarray, "state k"]
    subspace_overlap: Float[np.ndarray, "state state"]
    eigenvalue_growth: Float[np.ndarray, "state k"]  # lambda_k(l) / lambda_k(0)
    directional_growth: Float[np.ndarray, "state quantile"]  # 5/50/95% of u^T C_l u / u^T C_0 u, state-0 directions
    participation_ratio: Float[np.ndarray, " state"]
    condition_number: Float[np.ndarray, " state"]  # lambda_max / smallest eigenvalue within the rank
    rank: Int[np.ndarray, " state"]


RANK_TOLERANCE = 1e-9
MAX_MOMENT_PROMPTS = 64  # above: no bootstrap of the covariance claims (their prompt tables grow as prompts^3)


def covariance_shape(vectors: Float[Tensor, "state token d_model"], k: int = 10) -> CovarianceShape:
    """Eigen-structure of each state's token covariance, compared across states (float64).

    An isotropically scaled cloud ``x_l = c_l x_0`` has overlap 1 everywhere and eigenvalue and
    directional growth exactly ``c_l^2`` (tested).
    """
    n_states, n_tokens, d = vectors.shape
    if n_tokens < 2:
        raise ValueError("a covariance needs at least 2 tokens")
    k = min(k, d)
    eigenvalues, tops, directional, ranks, conditions = [], [], [], [], []
    u0 = var0 = None
    for l in range(n_states):
        x = vectors[l].to(torch.float64)
        x = x - x.mean(dim=0)
        cov = x.T @ x / (n_tokens - 1)
        s, U = torch.linalg.eigh(cov)
        s, U = s.flip(0).clamp(min=0.0), U.flip(1)
        rank = int((s > RANK_TOLERANCE * s[0]).sum())
        if u0 is None:
            u0, var0 = U[:, :rank], s[:rank]
        directional.append(to_numpy((u0 * (cov @ u0)).sum(dim=0) / var0))
        eigenvalues.append(to_numpy(s))
        tops.append(U[:, :k])
        ranks.append(rank)
        conditions.append(float(s[0] / s[rank - 1]) if rank else float("nan"))
    lam = np.stack(eigenvalues)
    top = torch.stack(tops)  # [state, d, k]
    overlap = to_numpy((torch.einsum("idk,jdm->ijkm", top, top) ** 2).sum(dim=(-1, -2))) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = lam[:, :k] / lam[:1, :k]
        participation = lam.sum(1) ** 2 / (lam**2).sum(1)
    return CovarianceShape(
        top_eigenvalues=lam[:, :k],
        subspace_overlap=overlap,
        eigenvalue_growth=growth,
        directional_growth=np.quantile(np.stack(directional), [0.05, 0.5, 0.95], axis=1).T,
        participation_ratio=participation,
        condition_number=np.array(conditions),
        rank=np.array(ranks, dtype=np.int64),
    )


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpansionTrack:
    """Every expansion quantity under one norm (``metric``: ``"euclidean"`` or a ``lensdyn.metric.METRICS`` name)."""

    metric: str
    norms: Float[np.ndarray, "state token"]
    mean_norm: Float[np.ndarray, " state"]
    scale_factor: Float[np.ndarray, " state"]
    hubble: Float[np.ndarray, " block"]
    hubble_epoch_starts: Int[np.ndarray, " epoch"]
    hubble_epoch_rates: Float[np.ndarray, " epoch"]
    h0: float
    h0_se: float
    h0_intercept: float
    r2: float
    per_token_h: Float[np.ndarray, " token"]
    per_token_h_mean: float
    per_token_h_std: float
    per_token_h_cv: float
    per_token_h_position_spearman: float
    per_token_h_position_p: float
    physical_cv: float
    comoving_cv: float
    cv_reduction: float
    cv_reduction_null: Float[np.ndarray, " permutation"]
    redshift: Float[np.ndarray, "state state"]

    @property
    def cv_reduction_null_mean(self) -> float:
        return float(np.mean(self.cv_reduction_null))

    @property
    def cv_reduction_p(self) -> float:
        """One-sided permutation p-value of the reduction exceeding its null, ``(1 + #null >= real) / (1 + n)``."""
        null = self.cv_reduction_null
        return float((1 + np.sum(null >= self.cv_reduction)) / (1 + len(null)))


def expansion_track(
    norms: Float[Tensor, "state token"],
    positions: Int[Tensor, " token"],
    metric: str,
    aggregation: str = "ratio_of_means",
    fit_space: FitSpace = "log",
    n_permutations: int = 400,
    seed: int = 0,
    null: Float[np.ndarray, " permutation"] | None = None,
) -> ExpansionTrack:
    """All of the track's numbers from one ``[state, token]`` matrix of norms; ``null``: its ``cv_reduction_null``
    where drawn already (``cv_reduction_nulls``, for several tracks at once)."""
    a = scale_factor(norms, aggregation)
    fit = fit_h0(a, fit_space)
    rates = per_token_h(norms, fit_space)
    physical, comoving, reduction = comoving_cv(norms, aggregation)
    rate = hubble(a)
    starts = piecewise_constant_segments(rate)
    epoch_rates = np.array([rate[s:e].mean() for s, e in zip(starts, [*starts[1:], len(rate)])])
    if len(rates) > 2 and np.ptp(to_numpy(positions)) > 0:
        rho, p = stats.spearmanr(rates, to_numpy(positions))
    else:
        rho, p = float("nan"), float("nan")
    return ExpansionTrack(
        metric=metric,
        norms=to_numpy(norms.to(torch.float64)),
        mean_norm=to_numpy(norms.to(torch.float64).mean(dim=1)),
        scale_factor=a,
        hubble=rate,
        hubble_epoch_starts=starts,
        hubble_epoch_rates=epoch_rates,
        h0=float(fit.rate[0]),
        h0_se=float(fit.rate_se[0]),
        h0_intercept=float(fit.intercept[0]),
        r2=float(fit.r2[0]),
        per_token_h=rates,
        per_token_h_mean=float(rates.mean()),
        per_token_h_std=float(rates.std(ddof=1)) if len(rates) > 1 else float("nan"),
        per_token_h_cv=float(rates.std(ddof=1) / abs(rates.mean())) if len(rates) > 1 else float("nan"),
        per_token_h_position_spearman=float(rho),
        per_token_h_position_p=float(p),
        physical_cv=physical,
        comoving_cv=comoving,
        cv_reduction=reduction,
        cv_reduction_null=cv_reduction_null(norms, aggregation, n_permutations, seed) if null is None else null,
        redshift=redshift_table(a),
    )


def resampled_track(
    track: ExpansionTrack, drawn: Int[np.ndarray, " drawn"], positions: Int[np.ndarray, " drawn"], aggregation: str,
    fit_space: FitSpace,
) -> ExpansionTrack:
    """``track`` on the tokens ``drawn`` (a bootstrap resample): a(l), its fit, H(l), the per-token
    rates' CV and position dependence, and the comoving CV reduction re-derived (against the data's
    permutation null, not redrawn); the epochs and the redshift table are the data's."""
    norms = torch.from_numpy(track.norms[:, drawn])
    a = scale_factor(norms, aggregation)
    fit = fit_h0(a, fit_space)
    rates = track.per_token_h[drawn]  # each token's own fit does not depend on the others
    physical, comoving, reduction = comoving_cv(norms, aggregation)
    rho, p = stats.spearmanr(rates, positions) if np.ptp(positions) > 0 else (float("nan"), float("nan"))
    return dataclasses.replace(
        track, norms=track.norms[:, drawn], mean_norm=to_numpy(norms.mean(dim=1)), scale_factor=a, hubble=hubble(a),
        h0=float(fit.rate[0]), h0_se=float(fit.rate_se[0]), h0_intercept=float(fit.intercept[0]), r2=float(fit.r2[0]),
        per_token_h=rates, per_token_h_mean=float(rates.mean()), per_token_h_std=float(rates.std(ddof=1)),
        per_token_h_cv=float(rates.std(ddof=1) / abs(rates.mean())), per_token_h_position_spearman=float(rho),
        per_token_h_position_p=float(p), physical_cv=physical, comoving_cv=comoving, cv_reduction=reduction,
    )


@dataclass(frozen=True, eq=False)
class ExpansionResult(Result):
    """Expansion of one model on one prompt set; ``control`` holds the untrained model's, measured alike.

    Arrays over ``state`` have ``n_layers + 1`` entries, over ``block`` ``n_layers``; ``token``
    runs over the capture's included tokens in (prompt, position) order.
    """

    euclidean: ExpansionTrack
    causal: ExpansionTrack
    causal_metric_condition_number: float
    causal_metric_ridge: float
    fit_space: str
    token_position: Int[np.ndarray, " token"]
    token_prompt: Int[np.ndarray, " token"]
    post_ln_norms: Float[np.ndarray, " block"]
    post_ln_cv: float  # std / mean of post_ln_norms across blocks
    post_ln_growth: float  # post_ln_norms[-1] / post_ln_norms[0]
    pre_ln_growth: float  # mean_norm[-1] / mean_norm[0] of the raw residual, for comparison
    attn_growth: Float[np.ndarray, " block"]  # mean over tokens of ||h + d||^2 - ||h||^2
    attn_growth_cross: Float[np.ndarray, " block"]  # mean 2 h.d
    mlp_growth: Float[np.ndarray, " block"]
    mlp_growth_cross: Float[np.ndarray, " block"]
    attn_share: float  # sum attn_growth / sum (attn_growth + mlp_growth)
    covariance: CovarianceShape
    control: "ExpansionResult | None" = None
    d_model: int | None = None
    causal_dual: ExpansionTrack | None = None  # None in results written before the dual metric
    aggregation: str = "ratio_of_means"
    post_ln_by_prompt: Float[np.ndarray, "prompt block"] | None = None  # sum over each prompt's tokens
    moments: CovarianceMoments | None = transient()  # states 0 and n_layers, for the bootstrap

    @property
    def n_layers(self) -> int:
        return len(self.euclidean.scale_factor) - 1

    @property
    def tracks(self) -> tuple[ExpansionTrack, ...]:
        """The measured tracks: Euclidean, ``causal_inverse`` (field ``causal``), ``causal_dual``."""
        return tuple(t for t in (self.euclidean, self.causal, self.causal_dual) if t is not None)

    def resample(self, rng: np.random.Generator) -> "ExpansionResult | None":
        """The claims' statistics on prompts drawn with replacement (``lensdyn.resampling``).

        Tracks are recomputed from the drawn tokens' norms, against the permutation null as drawn
        on the data; the covariance claims' participation ratio and overlap (states 0 and the
        last) come from ``moments``; every other covariance entry is NaN. None without the
        per-prompt data (a result read back from JSON).
        """
        if self.post_ln_by_prompt is None or self.moments is None:
            return None
        counts = prompt_counts(rng, self.provenance.n_prompts)
        drawn = resampled_tokens(self.token_prompt, counts)
        tracks = {f.name: resampled_track(t, drawn, self.token_position[drawn], self.aggregation, self.fit_space)
                  for f in dataclasses.fields(self) if isinstance(t := getattr(self, f.name), ExpansionTrack)}
        post_ln = (counts @ self.post_ln_by_prompt) / (counts @ self.moments.counts)
        nan = np.full_like(self.covariance.participation_ratio, np.nan)
        overlap = np.full_like(self.covariance.subspace_overlap, np.nan)
        pr = self.moments.participation_ratio(counts)
        overlap[0, -1] = overlap[-1, 0] = self.moments.subspace_overlap(counts, self.covariance.top_eigenvalues.shape[1])[0, 1]
        nan[0], nan[-1] = pr
        return dataclasses.replace(
            self, **tracks, post_ln_norms=post_ln, post_ln_cv=float(post_ln.std() / post_ln.mean()),
            covariance=dataclasses.replace(self.covariance, participation_ratio=nan, subspace_overlap=overlap),
            token_position=self.token_position[drawn], token_prompt=self.token_prompt[drawn], post_ln_by_prompt=None,
        )

    def track(self, metric: str) -> ExpansionTrack:
        """The track measured under ``metric`` (``"euclidean"``, ``"causal_inverse"`` or ``"causal_dual"``)."""
        names = {t.metric: t for t in self.tracks}
        if metric not in names:
            raise ArgumentError(f"metric must be one of {sorted(names)}, not {metric!r}")
        return names[metric]

    def summary(self) -> str:
        p = self.provenance
        lines = [
            f"Expansion: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, "
            f"{p.n_tokens} tokens; {self.conventions.aggregation}; fits in {self.fit_space} space",
            f"{'':34}" + "".join(f"{t.metric:>16}" for t in self.tracks)
            + f"{'control eucl.':>15}   write-up (Qwen3-4B, causal_inverse)",
        ]
        c = self.control

        def row(label: str, get, fmt: str, claim: str = "") -> None:
            ctrl = f"{get(c.euclidean):>15{fmt}}" if c is not None else f"{'-':>15}"
            lines.append(f"{label:34}" + "".join(f"{get(t):>16{fmt}}" for t in self.tracks) + f"{ctrl}   {claim}")

        row(f"a({self.n_layers}) = total growth", lambda t: t.scale_factor[-1], ".2f", "76.9 over 36 layers")
        row("H0 [1/layer]", lambda t: t.h0, ".4f", "0.1288")
        row("H0 standard error", lambda t: t.h0_se, ".4f", "0.0007")
        row("R^2 of the fit", lambda t: t.r2, ".4f", "0.9728")
        row("per-token H mean", lambda t: t.per_token_h_mean, ".4f", "0.1150")
        row("per-token H std", lambda t: t.per_token_h_std, ".4f", "0.0079")
        row("per-token H CV", lambda t: t.per_token_h_cv, ".2%", "6.85%")
        row("Spearman(per-token H, position)", lambda t: t.per_token_h_position_spearman, ".3f", "'no dependence'")
        row("physical CV", lambda t: t.physical_cv, ".1%", "125%")
        row("comoving CV", lambda t: t.comoving_cv, ".1%", "12.7%")
        row("cv_reduction", lambda t: t.cv_reduction, ".1%", "89.8%")
        row("cv_reduction_null (permuted)", lambda t: t.cv_reduction_null_mean, ".1%", "not run")
        row("permutation p (reduction > null)", lambda t: t.cv_reduction_p, ".3f", "")
        for track in self.tracks:
            bounds = [*track.hubble_epoch_starts[1:], self.n_layers]
            epochs = ", ".join(
                f"{s}-{e - 1}: {h:.3f}" for s, e, h in zip(track.hubble_epoch_starts, bounds, track.hubble_epoch_rates)
            )
            lines.append(f"H(l) epochs ({track.metric}), blocks: mean H = {epochs}")
        cc = f"{c.post_ln_cv:>15.1%}" if c is not None else f"{'-':>15}"
        gap = " " * 16 * (len(self.tracks) - 1)  # the value sits in the Euclidean column
        lines.append(f"{'post-LN norm CV across blocks':34}{self.post_ln_cv:>16.1%}{gap}{cc}   'constant if artifact'")
        cs = f"{c.attn_share:>15.1%}" if c is not None else f"{'-':>15}"
        cg = f"{c.post_ln_growth:>15.2f}" if c is not None else f"{'-':>15}"
        lines.append(
            f"{'post-LN norm, last / first block':34}{self.post_ln_growth:>16.2f}{gap}{cg}"
            f"   (raw residual: {self.pre_ln_growth:.1f})"
        )
        lines.append(f"{'attention share of growth':34}{self.attn_share:>16.1%}{gap}{cs}")
        cov = self.covariance
        lines.append(
            f"covariance: top-{cov.top_eigenvalues.shape[1]} subspace overlap state 0 vs {self.n_layers}: "
            f"{cov.subspace_overlap[0, -1]:.3f}; participation ratio {cov.participation_ratio[0]:.1f} -> "
            f"{cov.participation_ratio[-1]:.1f} (isotropic: d_model); C_0 rank {cov.rank[0]}, "
            f"condition number {cov.condition_number[0]:.3g}"
        )
        lines.append(
            f"variance growth along the {cov.rank[0]} layer-0 directions at state {self.n_layers}, / a^2: "
            f"5% {cov.directional_growth[-1, 0] / self.euclidean.scale_factor[-1] ** 2:.3g}, "
            f"median {cov.directional_growth[-1, 1] / self.euclidean.scale_factor[-1] ** 2:.3g}, "
            f"95% {cov.directional_growth[-1, 2] / self.euclidean.scale_factor[-1] ** 2:.3g} (isotropic: all 1)"
        )
        lines.append(
            f"causal metrics {', '.join(self.conventions.causal_metrics) or 'causal_inverse'}: condition number "
            f"{self.causal_metric_condition_number:.3g} (ridge {self.causal_metric_ridge:g}; the same for both)"
        )
        return "\n".join(lines)

    def figure(self):
        """Six panels: a(l), H(l), per-token H vs position, comoving CV vs null, post-LN norms, sublayer growth;
        the legend grouped by panel in the right margin (``lensdyn.plots.legend_by_panel``)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        titles = ("a(l) with exponential fit (log axis)", "Hubble rate H(l) per block", "per-token H vs position",
                  "comoving CV reduction vs null", "post-LN vs raw residual norm", "growth of ||h||^2 per sublayer")
        fig = make_subplots(rows=3, cols=2, vertical_spacing=0.12, horizontal_spacing=0.13, subplot_titles=titles)
        runs = [(self, plots.MODEL, plots.MODEL_2, "model")]
        runs += [(self.control, plots.CONTROL, plots.CONTROL_2, "control")] if self.control else []
        for r, colour, colour2, role in runs:
            states = np.arange(r.n_layers + 1)
            for track, dash in zip(r.tracks, ("solid", "dot", "dashdot")):
                fig.add_trace(go.Scatter(x=states, y=track.scale_factor, mode="lines+markers",
                                         line={"color": colour, "dash": dash}, name=f"{role}: {track.metric}"), row=1, col=1)
                fig.add_trace(go.Scatter(x=states, y=np.exp(track.h0_intercept + track.h0 * states), mode="lines",
                                         line={"color": colour, "dash": "dash", "width": 1},
                                         name=f"{role}: fit {track.metric}, H0 {track.h0:.3f}, R^2 {track.r2:.2f}"),
                              row=1, col=1)
                fig.add_trace(go.Scatter(x=np.arange(r.n_layers) + 0.5, y=track.hubble, mode="lines+markers",
                                         line={"color": colour, "dash": dash}, name=f"{role}: {track.metric}"),
                              row=1, col=2)
            fig.add_trace(go.Scatter(x=r.token_position, y=r.euclidean.per_token_h, mode="markers",
                                     marker={"color": colour, "size": 3, "opacity": 0.5},
                                     name=f"{role}: euclidean, rho {r.euclidean.per_token_h_position_spearman:+.2f}"),
                          row=2, col=1)
            for x0, track in enumerate(r.tracks):
                x = x0 + (0.2 if r is self.control else -0.2)
                fig.add_trace(go.Box(y=track.cv_reduction_null, x=np.full(len(track.cv_reduction_null), x),
                                     marker_color=colour2, name=f"{role}: permutation null", width=0.15,
                                     showlegend=x0 == 0), row=2, col=2)
                fig.add_trace(go.Scatter(x=[x], y=[track.cv_reduction], mode="markers",
                                         marker={"color": colour, "size": 12, "symbol": "diamond"},
                                         name=f"{role}: measured", showlegend=x0 == 0), row=2, col=2)
            blocks = np.arange(r.n_layers)
            fig.add_trace(go.Scatter(x=blocks, y=r.post_ln_norms, mode="lines+markers", line={"color": colour},
                                     name=f"{role}: attn_in (post-LN)"), row=3, col=1)
            fig.add_trace(go.Scatter(x=states, y=r.euclidean.mean_norm, mode="lines", line={"color": colour, "dash": "dot"},
                                     name=f"{role}: resid (raw)"), row=3, col=1)
            fig.add_trace(go.Bar(x=blocks, y=r.attn_growth, marker_color=colour, name=f"{role}: attention"), row=3, col=2)
            fig.add_trace(go.Bar(x=blocks, y=r.mlp_growth, marker_color=colour2, name=f"{role}: MLP"), row=3, col=2)
        norms = [t.scale_factor for r, *_ in runs for t in r.tracks]
        fig.update_yaxes(type="log", title_text="a(l) = mean ||x_l|| / mean ||x_0||", row=1, col=1, **plots.log_ticks(norms))
        fig.update_yaxes(title_text="H(l) = ln a(l+1) - ln a(l)", row=1, col=2)
        fig.update_yaxes(title_text="per-token H0 (ln norm / block)", row=2, col=1)
        fig.update_yaxes(title_text="1 - comoving CV / raw CV", row=2, col=2)
        raw = [r.post_ln_norms for r, *_ in runs] + [r.euclidean.mean_norm for r, *_ in runs]
        fig.update_yaxes(type="log", title_text="mean ||x|| (raw units)", row=3, col=1, **plots.log_ticks(raw))
        fig.update_yaxes(title_text="||h + d||^2 - ||h||^2 (raw units^2)", row=3, col=2)
        fig.update_xaxes(tickvals=list(range(len(self.tracks))), ticktext=[t.metric for t in self.tracks],
                         title_text="norm (metric)", row=2, col=2)
        for (row, col), text in {(1, 1): "state l", (1, 2): "block l", (2, 1): "token position",
                                 (3, 1): "block l (post-LN) / state l (raw)", (3, 2): "block l"}.items():
            fig.update_xaxes(title_text=text, row=row, col=col)
        plots.shrink_subplot_titles(fig)
        control = f"; control (grey): {self.control.provenance.model} ({self.control.provenance.weights})" if self.control else ""
        plots.legend_by_panel(fig, titles)
        fig.update_layout(title=f"Residual-stream expansion: model (colour) {self.provenance.model} "
                          f"({self.provenance.weights}){control}", title_font_size=15,
                          template="plotly_white", height=1150, barmode="group", margin={"r": 20})
        return fig


FLRW = citations.FLRW.source
HUBBLE_UNITS = "H: natural-log units of the norm per block (ln a(l+1) - ln a(l))"
COMOVING_FLOOR = 0.1  # the least share, of the variation the null leaves, that keeping token identity must remove
# The write-up read its causal claims under Cov(gamma)^-1; each is judged under both metrics (field, metric name).
CAUSAL_TRACKS = (("causal", "causal_inverse"), ("causal_dual", "causal_dual"))


def comoving_effect(t: ExpansionTrack) -> float:
    """How much of the comoving variation the permutation null leaves the real tokens remove:
    ``(reduction - null mean) / (1 - null mean)``."""
    return (t.cv_reduction - t.cv_reduction_null_mean) / (1 - t.cv_reduction_null_mean)


def under_each_causal_metric(claim: str, rule: str, test, p_value=None, effect=None, **judging) -> tuple[Claim, ...]:
    """One ``Claim`` per causal metric from one definition: ``test(track, result) -> (measured, holds)``,
    and ``p_value`` / ``effect`` of ``(track, result)`` where a p-value decides (``judging``: the rest of the Claim).

    ``rule`` names the metric where it says ``{metric}``; a result without the track is not testable.
    """
    def on(field: str, of):
        def judged(r):
            track = getattr(r, field)
            return ("not measured (result predates this metric)", None) if track is None else of(track, r)
        return judged

    def on_value(field: str, of):
        return None if of is None else (lambda r: of(getattr(r, field), r))

    return tuple(Claim(FLRW, f"{claim} ({METRIC_FORMULAS[name]})", rule.format(metric=METRIC_FORMULAS[name]), on(field, test),
                       p_value=on_value(field, p_value), effect=on_value(field, effect), **judging)
                 for field, name in CAUSAL_TRACKS)


CLAIMS = (
    *under_each_causal_metric(
        "norms grow exponentially (R^2 0.97)", "R^2 >= 0.95 of the exponential fit to a(l) under {metric}",
        lambda t, r: (f"H0 {t.h0:.3f}/block, R^2 {t.r2:.2f} ({r.fit_space} fit)", finite(t.r2 >= 0.95, t.r2)),
        units=HUBBLE_UNITS),
    Claim(FLRW, "final contraction", "H < 0 across the last block (final norm not a layer)",
          lambda r: (f"H(last) {r.euclidean.hubble[-1]:+.3f}/block", finite(r.euclidean.hubble[-1] < 0, r.euclidean.hubble[-1])),
          units=HUBBLE_UNITS),
    *under_each_causal_metric(
        "per-token H uniform, no position dependence",
        "per-token H under {metric}: CV <= 10% and Spearman with position p >= 0.05 (a claim of absence: not "
        "Holm-corrected)",
        lambda t, r: (f"CV {t.per_token_h_cv:.1%}, Spearman {t.per_token_h_position_spearman:+.2f}",
                      finite(t.per_token_h_cv <= 0.10 and t.per_token_h_position_p >= 0.05,
                             t.per_token_h_cv, t.per_token_h_position_p))),
    *under_each_causal_metric(
        "comoving coordinates remove the variation",
        "CV reduction under {metric} above its permutation null (Holm p < 0.05), removing >= "
        f"{COMOVING_FLOOR:.0%} of the variation the null leaves",
        lambda t, r: (f"{t.cv_reduction:.1%} vs null {t.cv_reduction_null_mean:.1%}",
                      finite(True, t.cv_reduction, t.cv_reduction_null_mean)),
        p_value=lambda t, r: (t.cv_reduction_p, len(t.cv_reduction_null)), effect=lambda t, r: comoving_effect(t),
        floor=COMOVING_FLOOR, effect_units="share of the null's comoving CV removed"),
    Claim(FLRW, "3: post-LN norms approximately constant", "CV of the post-LN norm across blocks <= 10%",
          lambda r: (f"CV {r.post_ln_cv:.1%}, x{r.post_ln_growth:.1f} (raw x{r.pre_ln_growth:.0f})",
                     finite(r.post_ln_cv <= 0.10, r.post_ln_cv))),
    Claim(FLRW, "1: metric shape constant across layers", "top-10 covariance subspace overlap, first vs last state >= 0.5",
          lambda r: (f"overlap {r.covariance.subspace_overlap[0, -1]:.2f} (of 1)",
                     finite(r.covariance.subspace_overlap[0, -1] >= 0.5, r.covariance.subspace_overlap[0, -1])),
          units="mean squared cosine of the principal angles, 0-1"),
    Claim(FLRW, "2: M(0) is Euclidean", "participation ratio of C_0 >= half of d_model",
          lambda r: (f"PR {r.covariance.participation_ratio[0]:.1f} of {r.d_model} dims",
                     finite(r.covariance.participation_ratio[0] >= r.d_model / 2, r.covariance.participation_ratio[0])
                     if r.d_model else None)),
)
ExpansionResult.claims = CLAIMS

def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    aggregation: str = "ratio_of_means",
    fit_space: FitSpace = "log",
    n_permutations: int = 400,
    top_k: int = 10,
    ridge: float = 1e-6,
    seed: int = 0,
    **capture_kwargs,
) -> ExpansionResult:
    """Expansion of a model (captured here) or of an existing ``Capture`` (pass ``model=`` for its unembedding).

    Args:
        capture_or_model: a ``Capture`` holding ``STREAMS``, or a model to run ``prompts`` through.
        model: the model a ``Capture`` came from (the causal metrics read its ``W_U``).
        control: ``"random"`` (default) measures the same architecture with random weights on the
            same prompts (needs a model lensdyn loaded); an ``ExpansionResult`` is attached as is;
            None skips it.
        aggregation: ``"ratio_of_means"`` or ``"mean_of_ratios"`` for ``a(l)``.
        fit_space: ``"log"`` or ``"linear"`` for ``h0`` and per-token ``H``.
        n_permutations: draws of the within-state token permutation null.
        top_k: eigenvectors compared across states.
        ridge: regularisation of both causal metrics (``lensdyn.metric``).
    """
    def measure_one(cap: Capture, model) -> ExpansionResult:
        metrics = tuple(model_causal_metric(model, ridge, name) for _, name in CAUSAL_TRACKS)
        return _measure_capture(cap, metrics, aggregation, fit_space, n_permutations, top_k, seed)

    return measure_with_control("expansion", capture_or_model, prompts, STREAMS, measure_one, model=model,
                                control=control, needs_model="the causal metric reads the model's unembedding",
                                **capture_kwargs)


def _measure_capture(
    cap: Capture, metrics: tuple[CausalMetric, ...], aggregation: str, fit_space: FitSpace, n_permutations: int,
    top_k: int, seed: int,
) -> ExpansionResult:
    cap.require_streams(STREAMS, allow_absent=True)
    mask = cap.mask
    if not bool(mask.any()):
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    vectors = cap.tokens_of("resid")  # [state, token, d_model]
    positions = torch.arange(mask.shape[1]).expand_as(mask)[mask]
    prompts = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    norms = {"euclidean": token_norms(vectors)} | {m.name: metric_norms(vectors, m) for m in metrics}
    fields = {"euclidean": "euclidean"} | {name: field for field, name in CAUSAL_TRACKS}
    nulls = dict(zip(norms, cv_reduction_nulls(list(norms.values()), aggregation, n_permutations, seed)))
    tracks = {fields[name]: expansion_track(n, positions, name, aggregation, fit_space, n_permutations, seed, nulls[name])
              for name, n in norms.items()}
    attn_in_norms = token_norms(cap.tokens_of("attn_in"))
    post_ln = to_numpy(attn_in_norms.mean(dim=1))
    attn_cross, attn_self = growth_terms(vectors[:-1], cap.tokens_of("attn_out"))
    # On parallel blocks the MLP writes into the block input too; the 2 a.m interaction is in neither share.
    mlp_cross, mlp_self = growth_terms(cap.mlp_writes_into(), cap.tokens_of("mlp_out"))
    attn_growth, mlp_growth = (attn_cross + attn_self).mean(dim=1), (mlp_cross + mlp_self).mean(dim=1)
    euclid = tracks["euclidean"]
    return ExpansionResult(
        conventions=Conventions(
            aggregation=f"a(l) as {aggregation.replace('_', ' ')} over included tokens pooled; per-token and "
            "comoving quantities per token, then averaged",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
            causal_metrics=tuple(m.name for m in metrics),
        ),
        provenance=Provenance.from_capture(cap),
        causal_metric_condition_number=metrics[0].condition_number,
        causal_metric_ridge=metrics[0].ridge,
        fit_space=fit_space,
        token_position=to_numpy(positions),
        token_prompt=to_numpy(prompts),
        post_ln_norms=post_ln,
        post_ln_cv=float(post_ln.std() / post_ln.mean()),
        post_ln_growth=float(post_ln[-1] / post_ln[0]),
        pre_ln_growth=float(euclid.mean_norm[-1] / euclid.mean_norm[0]),
        attn_growth=to_numpy(attn_growth),
        attn_growth_cross=to_numpy(attn_cross.mean(dim=1)),
        mlp_growth=to_numpy(mlp_growth),
        mlp_growth_cross=to_numpy(mlp_cross.mean(dim=1)),
        attn_share=float(attn_growth.sum() / (attn_growth.sum() + mlp_growth.sum())),
        covariance=covariance_shape(vectors, top_k),
        d_model=int(vectors.shape[-1]),
        aggregation=aggregation,
        post_ln_by_prompt=prompt_sums(to_numpy(attn_in_norms), to_numpy(prompts), cap.n_prompts),
        moments=CovarianceMoments.from_tokens(vectors[[0, -1]], to_numpy(prompts), cap.n_prompts)
        if cap.n_prompts <= MAX_MOMENT_PROMPTS else None,
        **{name: track for name, track in tracks.items()},
    )


@dataclass(frozen=True)
class ExpansionParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    aggregation: str = option("ratio_of_means", "how a(l) aggregates over tokens", choices=AGGREGATIONS)
    fit_space: FitSpace = option("log", "space of the exponential fits")
    n_permutations: int = option(400, "draws of the comoving-CV permutation null", flag="--permutations", at_least=1)


ANALYSIS = Analysis(
    name="expansion",
    help="scale factor a(l), Hubble rate, comoving CV with its null, causal metric, post-LN norms, covariance shape",
    heading="Expansion",
    order=20,
    streams=STREAMS,
    result=ExpansionResult,
    measure=measure,
    parameters=ExpansionParameters,
    # The reference column shows a control's reduction and null mean, no verdict: 100 draws estimate the mean.
    reference_keywords={"n_permutations": 100},
)
