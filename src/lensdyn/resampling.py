"""Bootstrap resampling over prompts: the draws, and the per-prompt sums a pooled statistic is re-derived from.

A verdict's robustness (``lensdyn.verdicts``) is the share of bootstrap resamples in which its rule
holds. lensdyn resamples **prompts** (a cluster bootstrap): a resample draws ``n`` of the ``n``
prompts with replacement, and every token comes with its prompt. Tokens of one prompt are not
independent (they share a context), so resampling them one by one would understate the spread
of a per-token statistic; resampling their prompts does not.

A pooled statistic need not be recomputed from the tokens: a prompt drawn ``c_p`` times
contributes ``c_p`` times its own sums. ``pooled_ratio`` does this for ratios of sums, and
``CovarianceMoments`` for the two statistics of a pooled covariance the write-ups' claims read
(participation ratio, exactly; the overlap of top eigenvector subspaces, by Rayleigh-Ritz).

>>> counts = prompt_counts(np.random.default_rng(0), 4)
>>> int(counts.sum())
4
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn.errors import ArgumentError
from lensdyn.ops import to_numpy


def prompt_counts(rng: np.random.Generator, n_prompts: int) -> Int[np.ndarray, " prompt"]:
    """How often each of ``n_prompts`` prompts is drawn in one resample: ``Multinomial(n, 1/n)``.

    >>> counts = prompt_counts(np.random.default_rng(1), 3)
    >>> len(counts), int(counts.sum())          # one count per prompt, n draws in all
    (3, 3)
    """
    return rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts))


def resampled_tokens(token_prompt: Int[np.ndarray, " token"], counts: Int[np.ndarray, " prompt"]) -> Int[np.ndarray, " drawn"]:
    """Indices of a resample's tokens: each token of prompt ``p`` ``counts[p]`` times, in token order.

    >>> resampled_tokens(np.array([0, 0, 1, 2]), np.array([2, 0, 1])).tolist()
    [0, 0, 1, 1, 3]
    """
    return np.repeat(np.arange(len(token_prompt)), counts[token_prompt])


def token_subsample(n_tokens: int, k: int, seed: int = 0) -> Int[np.ndarray, " kept"]:
    """``k`` of ``n_tokens`` token indices drawn without replacement under ``seed``, in order; all of them
    when ``k`` is 0 or at least ``n_tokens``. A prompt's drawn tokens still travel with it in a resample.

    >>> token_subsample(5, 0).tolist(), len(token_subsample(5, 3)), token_subsample(3, 9).tolist()
    ([0, 1, 2, 3, 4], 3, [0, 1, 2])
    """
    if k < 0:
        raise ArgumentError(f"a token subsample needs k >= 0 (0: every token), not {k}")
    if k == 0 or k >= n_tokens:
        return np.arange(n_tokens)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, size=k, replace=False))


def prompt_sums(
    values: Float[np.ndarray, "depth token"], token_prompt: Int[np.ndarray, " token"], n_prompts: int
) -> Float[np.ndarray, "prompt depth"]:
    """``S[p, l] = sum of values[l, t] over the tokens t of prompt p`` (float64).

    >>> prompt_sums(np.array([[1., 2., 4.]]), np.array([0, 0, 1]), 2).tolist()
    [[3.0], [4.0]]
    """
    out = np.zeros((n_prompts, values.shape[0]))
    np.add.at(out, token_prompt, np.asarray(values, dtype=np.float64).T)
    return out


def pooled_ratio(
    numerator: Float[np.ndarray, "prompt depth"], denominator: Float[np.ndarray, "prompt depth"],
    counts: Int[np.ndarray, " prompt"],
) -> Float[np.ndarray, " depth"]:
    """``sum_p c_p N[p] / sum_p c_p D[p]``: a ratio of pooled sums on a resample (``c = 1``: the data).

    Ratio of means pools (sum of numerators, sum of denominators); mean of ratios pools (sum of
    ratios, token count).

    >>> pooled_ratio(np.array([[2.], [9.]]), np.array([[1.], [3.]]), np.array([1, 1])).tolist()
    [2.75]
    """
    return (counts @ numerator) / (counts @ denominator)


def ratio_band(
    parts: Float[np.ndarray, "part prompt depth"], n_resamples: int = 200, seed: int = 0,
    quantiles: tuple[float, float] = (0.05, 0.95),
) -> Float[np.ndarray, "bound depth"]:
    """The ``quantiles`` over ``n_resamples`` bootstrap resamples of the prompts of ``pooled_ratio(*parts, c)``:
    the band a per-layer ratio statistic (a gain) is drawn with (a 90% band for the default quantiles).

    >>> parts = np.array([[[2.0], [2.0]], [[1.0], [1.0]]])   # two prompts, both with ratio 2: no spread
    >>> ratio_band(parts, 20).tolist()
    [[2.0], [2.0]]
    """
    numerator, denominator = parts
    n_prompts = numerator.shape[0]
    counts = np.random.default_rng(seed).multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_resamples)
    return np.quantile((counts @ numerator) / (counts @ denominator), quantiles, axis=0)


def ratio_parts(
    numerator: Float[np.ndarray, "depth token"], denominator: Float[np.ndarray, "depth token"],
    token_prompt: Int[np.ndarray, " token"], n_prompts: int, aggregation: str = "ratio_of_means",
) -> Float[np.ndarray, "part prompt depth"]:
    """The per-prompt sums ``pooled_ratio`` divides, for ``lensdyn.ops.aggregate_ratio``'s ``aggregation``.

    >>> parts = ratio_parts(np.array([[2., 9.]]), np.array([[1., 3.]]), np.array([0, 1]), 2, "mean_of_ratios")
    >>> pooled_ratio(parts[0], parts[1], np.array([1, 1])).tolist()
    [2.5]
    """
    if aggregation == "ratio_of_means":
        pair = (numerator, denominator)
    elif aggregation == "mean_of_ratios":
        pair = (numerator / denominator, np.ones_like(numerator))
    else:
        raise ArgumentError(f"aggregation must be 'ratio_of_means' or 'mean_of_ratios', not {aggregation!r}")
    return np.stack([prompt_sums(v, token_prompt, n_prompts) for v in pair])


@dataclass(frozen=True)
class CovarianceMoments:
    """Per-prompt moments of the pooled token covariance at a few states, for its resampled shape.

    For the pooled covariance ``C = A - mu mu^T`` with ``A = sum_p c_p S2_p / N``,
    ``mu = sum_p c_p S1_p / N`` (``S1_p``, ``S2_p``: prompt ``p``'s sum of ``x`` and of ``x x^T``;
    ``N = sum_p c_p n_p``), the participation ratio ``tr(C)^2 / ||C||_F^2`` needs only

        tr C = sum_p c_p tr S2_p / N - |mu|^2,   ||C||_F^2 = ||A||_F^2 - 2 mu^T A mu + |mu|^4,

    and ``||A||_F^2``, ``mu^T A mu``, ``|mu|^2`` are quadratic and cubic forms in ``c`` over the
    prompt tables ``<S2_p, S2_q>``, ``S1_q^T S2_p S1_r`` and ``S1_q . S1_r``: exact, with no
    ``d x d`` matrix per resample. The top-``k`` eigenvector subspaces are found by Rayleigh-Ritz in
    the span of the data's top-``rank`` eigenvectors at every state held (``basis``): exact where
    a resample's top-``k`` directions lie in that span, which they nearly do when the data's
    spectrum has a gap after ``k``; ``subspace_overlap`` at ``c = 1`` against the exact
    eigenvectors shows how near (tested).
    """

    counts: Int[np.ndarray, " prompt"]  # tokens per prompt
    trace: Float[np.ndarray, "state prompt"]  # tr S2_p
    s2_inner: Float[np.ndarray, "state prompt prompt"]  # <S2_p, S2_q>_F
    s1_inner: Float[np.ndarray, "state prompt prompt"]  # S1_p . S1_q
    cubic: Float[np.ndarray, "state prompt prompt prompt"]  # [p, q, r] = S1_q^T S2_p S1_r
    s1_basis: Float[np.ndarray, "state prompt rank"]  # S1_p in the basis
    s2_basis: Float[np.ndarray, "state prompt rank rank"]  # S2_p in the basis

    @classmethod
    def from_tokens(
        cls, vectors: Float[Tensor, "state token d_model"], token_prompt: Int[np.ndarray, " token"], n_prompts: int,
        rank: int = 32,
    ) -> "CovarianceMoments":
        """Moments of ``vectors`` (a few states, every included token) grouped by ``token_prompt``."""
        x_all = vectors.to(torch.float64)
        owner = torch.from_numpy(np.asarray(token_prompt)).to(x_all.device)
        onehot = torch.zeros(n_prompts, x_all.shape[1], dtype=torch.float64, device=x_all.device)
        onehot[owner, torch.arange(x_all.shape[1], device=x_all.device)] = 1.0
        tops = []
        for x in x_all:
            centred = x - x.mean(dim=0)
            _, vecs = torch.linalg.eigh(centred.T @ centred)
            tops.append(vecs[:, -rank:])
        basis = torch.linalg.qr(torch.cat(tops, dim=1)).Q  # [d_model, states * rank]
        fields: dict[str, list] = {name: [] for name in ("trace", "s2_inner", "s1_inner", "cubic", "s1_basis", "s2_basis")}
        for x in x_all:
            s1 = onehot @ x  # [prompt, d]
            fields["trace"].append(to_numpy(onehot @ (x * x).sum(dim=1)))
            fields["s1_inner"].append(to_numpy(s1 @ s1.T))
            # <S2_p, S2_q> = sum over token pairs (i in p, j in q) of (x_i . x_j)^2, one prompt's rows at a time.
            inner = torch.stack([((x[owner == p] @ x.T) ** 2).sum(dim=0) @ onehot.T for p in range(n_prompts)])
            fields["s2_inner"].append(to_numpy(inner))
            projected = x @ s1.T  # [token, prompt]: x_t . S1_q
            fields["cubic"].append(to_numpy(torch.einsum("pt,tq,tr->pqr", onehot, projected, projected)))
            z = x @ basis
            fields["s1_basis"].append(to_numpy(onehot @ z))
            fields["s2_basis"].append(to_numpy(torch.einsum("pt,ti,tj->pij", onehot, z, z)))
        return cls(counts=to_numpy(onehot.sum(dim=1)).astype(np.int64), **{k: np.stack(v) for k, v in fields.items()})

    def participation_ratio(self, counts: Int[np.ndarray, " prompt"]) -> Float[np.ndarray, " state"]:
        """``tr(C)^2 / ||C||_F^2`` of each state's pooled covariance on a resample (class docstring)."""
        c = counts.astype(np.float64)
        n = float(c @ self.counts)
        mu2 = np.einsum("q,sqr,r->s", c, self.s1_inner, c) / n**2
        trace = self.trace @ c / n - mu2
        a2 = np.einsum("p,spq,q->s", c, self.s2_inner, c) / n**2
        mu_a_mu = np.einsum("p,q,r,spqr->s", c, c, c, self.cubic) / n**3
        return trace**2 / (a2 - 2 * mu_a_mu + mu2**2)

    def subspace_overlap(self, counts: Int[np.ndarray, " prompt"], k: int) -> Float[np.ndarray, "state state"]:
        """``||U_i^T U_j||_F^2 / k`` between the states' top-``k`` Ritz subspaces on a resample."""
        c = counts.astype(np.float64)
        n = float(c @ self.counts)
        mu = np.einsum("p,spi->si", c, self.s1_basis) / n
        cov = np.einsum("p,spij->sij", c, self.s2_basis) / n - mu[:, :, None] * mu[:, None, :]
        tops = np.linalg.eigh(cov)[1][:, :, -k:]  # [state, rank, k]
        return (np.einsum("aik,bim->abkm", tops, tops) ** 2).sum(axis=(-1, -2)) / k
