"""Metastability: do tokens cluster on the sphere the way the idealized attention dynamics predicts?

The write-up tests Geshkovski et al.'s theory (attention as interacting particles on the sphere,
Q = K = V = I; see ``lensdyn.analyses.idealized``) in trained models. It reports clustering,
persistence and two timescales as confirmed, monotone energy and dimension-driven collapse as
falsified, and collapse speed following the spectral radius of V. lensdyn measures each per
prompt, per state, on the sphere-projected residual ``x_i = h_i / ||h_i||`` (float64), over the
capture's included tokens of that prompt:

- ``inner_product_histogram``: fractions of pairs ``i < j`` with ``<x_i, x_j>`` in ``BINS``
  (40 equal bins on [-1, 1]); ``mass_near_one``: fraction of pairs above ``threshold`` (0.9).
- ``effective_rank``: ``exp(H(p))``, ``p_k = s_k^2 / sum s^2`` from the singular values of the
  token matrix (uncentred): ``d`` for an isotropic cloud with many tokens, at most ``k`` for rank k.
- long prompts: the metrics take one state at a time (its ``n x n`` Gram and the previous state's);
  HDBSCAN clusters at most ``MAX_CLUSTER_TOKENS`` (2,048) tokens of a prompt, a seeded subsample of a
  longer one (``cluster_subsample``), recorded in ``Conventions.clustering`` and
  ``CloudMetrics.clustered_tokens``; every other metric reads every token.
- ``clusters``: HDBSCAN on the precomputed cosine distances ``1 - <x_i, x_j>`` (float64): number
  of clusters and fraction of tokens left as noise. The library is the ``hdbscan`` package
  (scikit-learn-contrib), called with ``hdbscan_settings(min_cluster_size)``: ``min_cluster_size``
  5 by default and ``min_samples`` equal to it, which that package counts *without* the point
  itself (a core point has 5 other tokens within its core distance); ``sklearn.cluster.HDBSCAN``
  counts the point, so the same clustering there is ``min_samples = min_cluster_size + 1``
  (``sklearn_settings``). Every result records both in ``Conventions.clustering``.
- ties: tokens that are one point up to rounding (``lensdyn.sphere.tie_representatives``: chord
  distance at most ``tie_tolerance``, 1e-4 by default) leave HDBSCAN nothing to rank, and its
  count then follows rounding noise (repeated tokens, or equal embeddings at state 0). So each
  token's distances are read from its tie group's representative and tied tokens are at distance
  exactly 0: HDBSCAN sees each group as one point of its multiplicity, deterministically; a group
  of more than ``min_samples`` tokens is dense by itself, and a cloud that is a single group (the
  ``repeated`` set) has 0 clusters and all noise, as any single blob does (HDBSCAN reports no
  one-cluster answer). A cloud without ties is clustered exactly as before the rule. Per state,
  ``tied_fraction`` is the share of tokens in a group of two or more.
- ``nearest_neighbour_stability``: fraction of tokens whose nearest neighbour (by inner
  product, itself excluded) is the same at state ``l`` and ``l + 1``.
- ``linear_cka`` between consecutive states (centred Gram matrices); ``plateaus``: runs of at least
  ``min_length`` consecutive blocks with CKA >= ``CKA_PLATEAU`` (0.95).
- two timescales from the HDBSCAN counts: ``formation`` is the first state where at least half
  the tokens are in clusters; ``persistence`` the length of the longest run of states from there
  with an unchanged cluster count (the metastable window); ``merge`` the first state after that
  run where the count falls (-1: never); ``timescale_ratio = persistence / max(formation, 1)``.
- ``interaction_energy`` ``E_beta = (1 / (2 beta n^2)) sum_ij exp(beta <x_i, x_j>)`` for each beta
  in ``BETAS``; a violation is a block across which it falls by more than ``rtol`` (relative),
  reported with the token pairs whose ``exp(beta <x_i, x_j>)`` fell most.
- attention graphs (opt-in, need ``attention=True`` in the capture): ``fiedler`` value (second
  smallest Laplacian eigenvalue) of the symmetrised ``(A + A^T) / 2``, Sinkhorn-scaled to doubly
  stochastic, per head and block; and the same for attention that is uniform over the causal mask
  (or over all tokens, for encoders): what the mask alone produces.
- spectra: ``rho(V)`` and ``rho(OV)`` per block and the fraction of complex OV eigenvalues
  (``lensdyn.hooks.circuits``); ``collapse_speed`` = per-block rise of mean ``mass_near_one``,
  and its Spearman correlation with each radius across blocks.

Controls ride along and are never averaged in: ``control`` (same architecture, random weights)
and ``repeated`` (the ``repeated`` prompt set, a collapse diagnostic only).

>>> result = metastability.measure(ld.load_model("smollm2-135m"), "diverse")   # doctest: +SKIP
>>> print(result.summary())                                                    # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import linalg as sla
from scipy import stats
from torch import Tensor

from lensdyn import citations, plots
from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import Capture, capture_for
from lensdyn.hooks.circuits import circuit_spectra
from lensdyn.ops import to_numpy
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.resampling import prompt_counts
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.sphere import (BETAS, TIE_TOLERANCE, energy_of_terms, energy_terms, pair_histogram, pair_values, sphere,
                            sphere_gram, tie_representatives, tied_fraction, upper_pair_indices)
from lensdyn.sphere import (BINS, cloud_grams, inner_product_histogram,  # noqa: F401 - still metastability.BINS and
                            interaction_energy)  # .cloud_grams, .inner_product_histogram, .interaction_energy, as before
from lensdyn.verdicts import Claim, finite, judge

STREAMS = ("resid",)
MASS_THRESHOLD = 0.9
CKA_PLATEAU = 0.95
MIN_CLUSTER_SIZE = 5
# HDBSCAN's precomputed distances and its time grow as n^2: past this many tokens a prompt's clusters are
# those of a seeded subsample (cluster_subsample). Measured on 2 busy cores: 0.2-0.6 s a state at 2,048 tokens, 1.5 s at 4,096.
MAX_CLUSTER_TOKENS = 2048
CLUSTER_SEED = 0


# --- pure functions of one token cloud ----------------------------------------------------
# (the sphere projection, the Gram matrices, the inner-product histogram and E_beta are lensdyn.sphere's,
# shared with the streaming accumulators)


def mass_near_one(gram: Float[Tensor, "n n"], threshold: float = MASS_THRESHOLD) -> float:
    """Fraction of pairs ``i < j`` with ``<x_i, x_j> > threshold``.

    >>> mass_near_one(torch.ones(3, 3, dtype=torch.float64))
    1.0
    """
    return mass_of_pairs(pair_values(gram), threshold)


def mass_of_pairs(values: Float[Tensor, " pair"], threshold: float = MASS_THRESHOLD) -> float:
    """``mass_near_one`` of pair values already read off a Gram (``pair_values``).

    >>> mass_of_pairs(torch.tensor([0.95, 0.5]))
    0.5
    """
    # A count over the number of pairs: the mean of the 0/1 indicators bit for bit, without their n^2 / 2 float64 copy.
    return int((values > threshold).sum()) / values.numel() if values.numel() else float("nan")


def effective_rank(gram: Float[Tensor, "m m"]) -> float:
    """``exp(-sum p log p)`` with ``p`` the normalised eigenvalues of the Gram matrix (= squared singular values).

    ``gram`` is the tokens' ``X X^T`` (``n x n``) or the features' ``X^T X`` (``d x d``): both hold the squared
    singular values of ``X``, so the smaller one gives the same rank (``cloud_metrics`` passes it).

    >>> round(effective_rank(torch.eye(4, dtype=torch.float64)), 6)
    4.0
    >>> round(effective_rank(torch.ones(4, 4, dtype=torch.float64)), 6)
    1.0
    """
    s = torch.linalg.eigvalsh(gram).clamp(min=0.0)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def hdbscan_settings(min_cluster_size: int = MIN_CLUSTER_SIZE) -> dict[str, object]:
    """The keywords of ``hdbscan.HDBSCAN`` (the scikit-learn-contrib package) that ``clusters`` uses.

    ``min_samples`` as that package counts it: neighbours of a point, the point itself not counted.

    >>> hdbscan_settings(5)["min_samples"]
    5
    """
    return dict(metric="precomputed", min_cluster_size=min_cluster_size, min_samples=min_cluster_size, alpha=1.0,
                cluster_selection_method="eom", cluster_selection_epsilon=0.0, allow_single_cluster=False)


def sklearn_settings(min_cluster_size: int = MIN_CLUSTER_SIZE) -> dict[str, object]:
    """``hdbscan_settings`` for ``sklearn.cluster.HDBSCAN``, whose ``min_samples`` counts the point itself (+1).

    >>> sklearn_settings(5)["min_samples"]
    6
    """
    settings = hdbscan_settings(min_cluster_size)
    return {**settings, "min_samples": settings["min_samples"] + 1}


def clustering_convention(min_cluster_size: int = MIN_CLUSTER_SIZE, tie_tolerance: float = TIE_TOLERANCE,
                          max_cluster_tokens: int = MAX_CLUSTER_TOKENS) -> str:
    """How ``clusters`` clusters, in words a reader can rerun with either library (``Conventions.clustering``)."""
    import importlib.metadata

    settings = hdbscan_settings(min_cluster_size)
    keywords = ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "min_samples")
    return (f"hdbscan {importlib.metadata.version('hdbscan')} (scikit-learn-contrib) HDBSCAN({keywords}, "
            f"min_samples={settings['min_samples']}) on float64 cosine distances 1 - <x_i, x_j>; min_samples counts "
            f"neighbours without the point itself: sklearn.cluster.HDBSCAN min_samples={settings['min_samples'] + 1}; "
            f"ties: tokens within chord distance {tie_tolerance:g} (chained) take their group's lowest-index token's "
            "distances, 0 among themselves; a prompt of more than "
            f"{max_cluster_tokens} tokens is clustered on {max_cluster_tokens} of them, drawn without replacement by "
            f"numpy.random.default_rng({CLUSTER_SEED}), the same tokens at every state (CloudMetrics.clustered_tokens)")


def clusters(
    gram: Float[Tensor, "n n"],
    min_cluster_size: int = MIN_CLUSTER_SIZE,
    tie_tolerance: float = TIE_TOLERANCE,
    *,
    representatives: Int[np.ndarray, " n"] | None = None,
) -> tuple[int, float, Int[np.ndarray, " n"]]:
    """HDBSCAN (``hdbscan_settings``) on cosine distances with ties collapsed: ``(n_clusters, noise_fraction, labels)``.

    ``d_ij = 1 - <x_r(i), x_r(j)>``, ``r`` the tie representative (``tie_representatives``), and 0
    where ``r(i) = r(j)``; label -1 is noise. Tied tokens therefore share a label. ``representatives``:
    ``tie_representatives(gram, tie_tolerance)`` where the caller has them already.

    >>> x = sphere(torch.eye(3, dtype=torch.float64).repeat_interleave(6, dim=0))  # 3 points, 6 copies each
    >>> clusters(x @ x.T)[:2]
    (3, 0.0)
    """
    import hdbscan

    n = gram.shape[0]
    if n < max(min_cluster_size, 2):
        return 0, 1.0, np.full(n, -1, dtype=np.int64)
    if representatives is None:
        representatives = tie_representatives(gram, tie_tolerance)
    rep = torch.from_numpy(representatives)
    if bool((rep == torch.arange(n)).all()):  # untied, the usual case: tied only to itself, the diagonal
        distance = to_numpy((1.0 - gram.to(torch.float64)).clamp_(min=0.0))
        np.fill_diagonal(distance, 0.0)
    else:
        distance = to_numpy((1.0 - gram[rep[:, None], rep].to(torch.float64)).clamp_(min=0.0))
        distance[to_numpy(rep[:, None] == rep[None, :])] = 0.0
    labels = hdbscan.HDBSCAN(**hdbscan_settings(min_cluster_size)).fit_predict(distance)
    return int(labels.max() + 1), float((labels < 0).mean()), labels.astype(np.int64)


def nearest_neighbours(gram: Float[Tensor, "n n"]) -> Int[Tensor, " n"]:
    """Each token's nearest neighbour by inner product, itself excluded: ``argmax_{j != i} <x_i, x_j>``.

    >>> nearest_neighbours(torch.tensor([[1., .9, .1], [.9, 1., .2], [.1, .2, 1.]], dtype=torch.float64)).tolist()
    [1, 0, 1]
    """
    # The diagonal is set aside and restored exactly, not subtracted: a copy of a long prompt's Gram is n^2 float64.
    diagonal = gram.diagonal().clone()
    gram.diagonal().fill_(-torch.inf)
    try:
        return gram.argmax(dim=1)
    finally:
        gram.diagonal().copy_(diagonal)


def neighbour_stability(nearest_a: Int[Tensor, " n"], nearest_b: Int[Tensor, " n"]) -> float:
    """Fraction of tokens with the same nearest neighbour (``nearest_neighbours``) in both clouds.

    >>> neighbour_stability(torch.tensor([1, 0, 1]), torch.tensor([1, 0, 0]))
    0.6666666666666666
    """
    return float((nearest_a == nearest_b).to(torch.float64).mean())


def nearest_neighbour_stability(gram_a: Float[Tensor, "n n"], gram_b: Float[Tensor, "n n"]) -> float:
    """Fraction of tokens whose nearest neighbour (itself excluded) is the same in both clouds.

    >>> g = torch.tensor([[1., .9, .1], [.9, 1., .2], [.1, .2, 1.]], dtype=torch.float64)
    >>> nearest_neighbour_stability(g, g)
    1.0
    """
    return neighbour_stability(nearest_neighbours(gram_a), nearest_neighbours(gram_b))


def _centred(gram: Tensor) -> Tensor:
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def linear_cka(gram_a: Float[Tensor, "n n"], gram_b: Float[Tensor, "n n"]) -> float:
    """Linear CKA from Gram matrices: ``<K_c, L_c> / (||K_c|| ||L_c||)`` with double-centred ``K, L``.

    Equal to ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)``; invariant to rotations and
    isotropic scaling of either cloud.

    >>> x = torch.randn(10, 4, dtype=torch.float64)
    >>> round(linear_cka(x @ x.T, x @ x.T), 12)
    1.0
    """
    k, l = _centred(gram_a), _centred(gram_b)
    return float((k * l).sum() / (k.norm() * l.norm()))


def linear_cka_features(x: Float[Tensor, "n d"], y: Float[Tensor, "n e"]) -> float:
    """``linear_cka`` from the token matrices themselves: ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)``,
    ``X_c`` with centred columns. The same number as ``linear_cka(x @ x.T, y @ y.T)`` to round-off, in ``n d^2``
    rather than ``n^2`` work and memory: ``cloud_metrics`` takes it once tokens outnumber dimensions.

    >>> x = torch.randn(10, 4, dtype=torch.float64)
    >>> round(linear_cka_features(x, 2.0 * x), 12)
    1.0
    """
    return cka_of_centred(centred_features(x), centred_features(y))


class CentredFeatures(NamedTuple):
    """A cloud's ``X_c`` (columns centred) and ``||X_c^T X_c||_F``: one state's share of ``linear_cka_features``,
    formed once and used against the state before and the state after."""

    centred: Float[Tensor, "n d"]
    self_norm: Float[Tensor, ""]


def centred_features(x: Float[Tensor, "n d"]) -> CentredFeatures:
    """``X_c = X - mean_rows(X)`` and ``||X_c^T X_c||_F``.

    >>> centred_features(torch.tensor([[1., 0.], [3., 0.]])).self_norm.item()
    2.0
    """
    centred = x - x.mean(0, keepdim=True)
    return CentredFeatures(centred, (centred.T @ centred).norm())


def cka_of_centred(x: CentredFeatures, y: CentredFeatures) -> float:
    """``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` of two ``centred_features``.

    >>> f = centred_features(torch.randn(10, 4, dtype=torch.float64))
    >>> round(cka_of_centred(f, f), 12)
    1.0
    """
    return float((y.centred.T @ x.centred).square().sum() / (x.self_norm * y.self_norm))


def plateaus(values: Float[np.ndarray, " n"], threshold: float = CKA_PLATEAU, min_length: int = 2) -> list[tuple[int, int]]:
    """Runs ``(start, end)`` (inclusive) of at least ``min_length`` consecutive values ``>= threshold``.

    >>> plateaus(np.array([0.99, 0.5, 0.97, 0.98, 0.99, 0.2]))
    [(2, 4)]
    """
    runs, start = [], None
    for i, v in enumerate([*values, -np.inf]):
        if v >= threshold and start is None:
            start = i
        elif v < threshold and start is not None:
            if i - start >= min_length:
                runs.append((start, i - 1))
            start = None
    return runs


PAIR_CHUNK = 4096  # pair changes per chunk of smallest_pairs' two-step top-k


def smallest_pairs(change: Float[Tensor, " pair"], indices: Int[Tensor, " pair"], n: int, k: int = 5
                   ) -> list[tuple[int, int, float]]:
    """The ``k`` pairs with the smallest ``change``, smallest first: ``(i, j, change)``. ``change[p]`` is the pair at
    flat index ``indices[p] = i n + j`` of an ``n x n`` matrix (``lensdyn.sphere.upper_pair_indices``).

    >>> smallest_pairs(torch.tensor([-2., 1., -1.]), upper_pair_indices(3), 3, k=2)     # pairs (0,1), (0,2), (1,2)
    [(0, 1, -2.0), (1, 2, -1.0)]
    """
    k = min(k, change.numel())
    # The k smallest entries lie in the k chunks of smallest minimum: a top-k over k chunks, not over all n^2 / 2
    # entries (4,096 tokens: 2 ms, not 75).
    chunk = max(k, PAIR_CHUNK)
    whole = change.numel() // chunk  # whole chunks; the rest of the entries are candidates as they are
    rows = torch.topk(change[: whole * chunk].view(whole, chunk).amin(dim=1), min(k, whole), largest=False).indices
    candidates = torch.cat([(rows[:, None] * chunk + torch.arange(chunk, device=change.device)).view(-1),
                            torch.arange(whole * chunk, change.numel(), device=change.device)])
    order = candidates[torch.topk(change[candidates], k, largest=False).indices]
    return [(int(indices[o]) // n, int(indices[o]) % n, float(change[o])) for o in order]


def cluster_subsample(n: int, max_tokens: int = MAX_CLUSTER_TOKENS, seed: int = CLUSTER_SEED) -> Int[np.ndarray, " m"] | None:
    """The tokens HDBSCAN clusters: all of them (None) up to ``max_tokens``, else ``max_tokens`` indices drawn
    without replacement by ``numpy.random.default_rng(seed)``, sorted: the same tokens at every state.

    >>> cluster_subsample(10, 20) is None
    True
    >>> cluster_subsample(10, 4).tolist() == cluster_subsample(10, 4).tolist()
    True
    """
    if max_tokens < 2:
        raise ArgumentError(f"max_tokens must be at least 2 (HDBSCAN needs a pair), not {max_tokens}")
    if n <= max_tokens:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_tokens, replace=False)).astype(np.int64)


@dataclass(frozen=True)
class Timescales:
    """Fast formation, slow merging (module docstring); -1 where an event never happens."""

    formation: int
    persistence: int
    merge: int
    ratio: float


def two_timescales(n_clusters: Int[np.ndarray, " state"], noise_fraction: Float[np.ndarray, " state"]) -> Timescales:
    """Formation, persistence and merge read off a cluster-count profile.

    >>> two_timescales(np.array([0, 0, 3, 3, 3, 3, 2, 1]), np.array([1, 1, .2, .1, .1, .1, .1, 0]))
    Timescales(formation=2, persistence=4, merge=6, ratio=2.0)
    """
    formed = np.nonzero((noise_fraction <= 0.5) & (n_clusters >= 1))[0]
    if len(formed) == 0:
        return Timescales(-1, 0, -1, float("nan"))
    formation = int(formed[0])
    best_start, best_len, start = formation, 1, formation
    for s in range(formation + 1, len(n_clusters) + 1):
        if s == len(n_clusters) or n_clusters[s] != n_clusters[start]:
            if s - start > best_len:
                best_start, best_len = start, s - start
            start = s
    end = best_start + best_len
    merge = next((s for s in range(end, len(n_clusters)) if n_clusters[s] < n_clusters[end - 1]), -1)
    return Timescales(formation, best_len, int(merge), best_len / max(formation, 1))


def sinkhorn(matrix: Float[Tensor, "n n"], iterations: int = 200, tol: float = 1e-10) -> Float[Tensor, "n n"]:
    """Symmetric Sinkhorn scaling ``D W D`` of a positive symmetric matrix to doubly stochastic."""
    w = matrix.to(torch.float64)
    d = torch.ones(w.shape[0], dtype=w.dtype)
    for _ in range(iterations):
        d_new = torch.sqrt(d / (w @ d))
        if torch.max(torch.abs(d_new - d)) < tol:
            d = d_new
            break
        d = d_new
    return d[:, None] * w * d[None, :]


def fiedler(attention: Float[Tensor, "query key"]) -> float:
    """Second-smallest eigenvalue of ``I - S``, ``S`` the Sinkhorn-scaled ``(A + A^T) / 2``.

    >>> round(fiedler(torch.full((4, 4), 0.25, dtype=torch.float64)), 6)                 # complete graph
    1.0
    """
    s = sinkhorn((attention + attention.T) / 2.0)
    laplacian = torch.eye(s.shape[0], dtype=s.dtype) - s
    return float(sla.eigh(to_numpy(laplacian), eigvals_only=True, subset_by_index=[1, 1])[0])


def mask_only_attention(n: int, causal: bool) -> Float[Tensor, "n n"]:
    """Attention that is uniform over what the mask allows: the structure the mask alone supplies."""
    allowed = torch.tril(torch.ones(n, n, dtype=torch.float64)) if causal else torch.ones(n, n, dtype=torch.float64)
    return allowed / allowed.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class EnergyViolation:
    """A block across which ``E_beta`` fell, and the pairs ``(i, j, change of exp(beta <x_i, x_j>))`` that fell most."""

    beta: float
    block: int
    relative_drop: float
    pairs: tuple[tuple[int, int, float], ...]


@dataclass(frozen=True)
class CloudMetrics:
    """Every per-state metric of one trajectory of token clouds (one prompt, an iteration, or a simulation)."""

    histogram: Float[np.ndarray, "state bin"]
    mass_near_one: Float[np.ndarray, " state"]
    effective_rank: Float[np.ndarray, " state"]
    n_clusters: Int[np.ndarray, " state"]
    noise_fraction: Float[np.ndarray, " state"]
    nn_stability: Float[np.ndarray, " block"]
    cka: Float[np.ndarray, " block"]
    energy: Float[np.ndarray, "beta state"]
    energy_violations: tuple[EnergyViolation, ...]
    plateaus: tuple[tuple[int, int], ...]
    timescales: Timescales
    tied_fraction: Float[np.ndarray, " state"] | None = None  # None: written before ties were collapsed
    clustered_tokens: int | None = None  # tokens HDBSCAN saw (cluster_subsample); None: written before the subsample


def cloud_metrics(
    states: Float[Tensor, "state n d_model"],
    betas: tuple[float, ...] = BETAS,
    threshold: float = MASS_THRESHOLD,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
    rtol: float = 1e-6,
    cka_threshold: float = CKA_PLATEAU,
    tie_tolerance: float = TIE_TOLERANCE,
    max_cluster_tokens: int = MAX_CLUSTER_TOKENS,
) -> CloudMetrics:
    """All metrics of a trajectory ``states[t]`` of ``n`` tokens, each state projected to the sphere.

    State by state: one ``n x n`` Gram and its pair values ``i < j``, and the previous state's (for the block
    metrics: CKA, neighbour stability, the pairs of an energy violation), are held at a time, about ``4 n^2``
    float64 with the energy terms, whatever the depth.
    HDBSCAN clusters ``cluster_subsample(n, max_cluster_tokens)``: every token up to that many.
    """
    n_states, n, d = states.shape
    sample = cluster_subsample(n, max_cluster_tokens)
    energy = np.zeros((len(betas), n_states))
    histogram, mass, rank, n_clusters, noise, tied, cka, stability, violations = ([] for _ in range(9))
    previous = previous_nearest = previous_features = None
    # Reused state after state (a fresh n x n float64 costs its page faults): this state's and the previous state's
    # Gram and pair values, and two vectors of energy terms.
    pair_index = upper_pair_indices(n, states.device)

    def buffers(*shape: int) -> list[Tensor]:
        return [torch.empty(*shape, dtype=torch.float64, device=states.device) for _ in range(2)]

    grams, pairs, (terms, previous_terms) = buffers(n, n), buffers(len(pair_index)), buffers(len(pair_index))
    chosen = None if sample is None else torch.from_numpy(sample).to(states.device)
    for t in range(n_states):
        x = sphere(states[t])
        gram = sphere_gram(x, out=grams[t % 2])  # state_gram's own product, from the x the features need too
        values = pair_values(gram, pair_index, out=pairs[t % 2])
        features = centred_features(x) if n > d else None
        for bi, beta in enumerate(betas):
            energy[bi, t] = energy_of_terms(energy_terms(values, beta, out=terms), energy_terms(gram.diagonal(), beta), beta)
            drop = (energy[bi, t - 1] - energy[bi, t]) / energy[bi, t - 1] if t else -np.inf
            if drop > rtol:  # the pairs that fell most: this state's terms less the previous state's
                change = torch.sub(terms, energy_terms(pairs[(t - 1) % 2], beta, out=previous_terms), out=previous_terms)
                violations.append((bi, EnergyViolation(beta=float(beta), block=t - 1, relative_drop=float(drop),
                                                        pairs=tuple(smallest_pairs(change, pair_index, n)))))
        ties = tie_representatives(gram, tie_tolerance)
        tied.append(tied_fraction(ties))
        if sample is None:
            count, fraction, _ = clusters(gram, min_cluster_size, representatives=ties)
        else:
            count, fraction, _ = clusters(gram[chosen[:, None], chosen], min_cluster_size, tie_tolerance)
        n_clusters.append(count)
        noise.append(fraction)
        histogram.append(pair_histogram(values))
        mass.append(mass_of_pairs(values, threshold))
        if n <= d:
            rank.append(effective_rank(gram))
        else:  # the d x d Gram of the features: the same spectrum, d^3 not n^3 to decompose
            rank.append(effective_rank(x.T @ x))
        nearest = nearest_neighbours(gram)
        if previous is not None:
            # n > d: CKA from the d x d cross-covariances, the same number without the n x n centred Grams.
            cka.append(linear_cka(previous, gram) if features is None else cka_of_centred(previous_features, features))
            stability.append(neighbour_stability(previous_nearest, nearest))
        previous, previous_nearest, previous_features = gram, nearest, features
    n_clusters, noise, cka = np.array(n_clusters, dtype=np.int64), np.array(noise), np.array(cka)
    return CloudMetrics(
        histogram=np.stack(histogram),
        mass_near_one=np.array(mass),
        effective_rank=np.array(rank),
        n_clusters=n_clusters,
        noise_fraction=noise,
        nn_stability=np.array(stability),
        cka=cka,
        energy=energy,
        energy_violations=tuple(v for _, v in sorted(violations, key=lambda bv: (bv[0], bv[1].block))),  # by beta, block
        plateaus=tuple(plateaus(cka, cka_threshold)),
        timescales=two_timescales(n_clusters, noise),
        tied_fraction=np.array(tied),
        clustered_tokens=n if sample is None else len(sample),
    )


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MetastabilityResult(Result):
    """Per-prompt cloud metrics of one model; ``control`` (random weights) and ``repeated`` (the
    collapse diagnostic) are measured alike and kept apart."""

    prompt_labels: tuple[str, ...]
    prompts: tuple[CloudMetrics, ...]
    betas: tuple[float, ...]
    mass_threshold: float
    min_cluster_size: int
    v_radius: Float[np.ndarray, " block"] | None
    ov_radius: Float[np.ndarray, " block"]
    ov_complex_fraction: Float[np.ndarray, " block"]
    collapse_speed: Float[np.ndarray, " block"]  # mean over prompts of the rise of mass_near_one across block l
    collapse_vs_v_spearman: float
    collapse_vs_ov_spearman: float
    fiedler: Float[np.ndarray, "block head"] | None = None  # mean over prompts
    fiedler_mask_only: float | None = None  # mean over prompts of the mask-only graph's value
    control: "MetastabilityResult | None" = None
    repeated: "MetastabilityResult | None" = None
    tie_tolerance: float | None = None  # chord distance of the tie rule; None: written before the rule

    @property
    def n_layers(self) -> int:
        return len(self.ov_radius)

    def mean(self, name: str) -> Float[np.ndarray, "*shape"]:
        """A per-prompt metric (``mass_near_one``, ``energy``, ...) averaged over this result's prompts."""
        return np.mean([getattr(p, name) for p in self.prompts], axis=0)


    def resample(self, rng: np.random.Generator) -> "MetastabilityResult":
        """This result on prompts drawn with replacement: their clouds as measured, the collapse speed re-averaged."""
        drawn = np.repeat(np.arange(len(self.prompts)), prompt_counts(rng, len(self.prompts)))
        prompts = tuple(self.prompts[i] for i in drawn)
        speed = collapse_speed(prompts)
        return dataclasses.replace(
            self, prompts=prompts, prompt_labels=tuple(self.prompt_labels[i] for i in drawn), repeated=None,
            collapse_speed=speed, collapse_vs_v_spearman=_spearman(speed, self.v_radius),
            collapse_vs_ov_spearman=_spearman(speed, self.ov_radius),
        )

    def counts(self) -> dict[str, int]:
        """How many real prompts show each phenomenon, by the rules of ``CLAIMS``."""
        real = self.prompts
        return {
            "prompts": len(real),
            "clustered": sum(p.effective_rank[-1] <= 0.5 * p.effective_rank[0] and p.n_clusters[-1] >= 1 for p in real),
            "plateau": sum(len(p.plateaus) > 0 for p in real),
            "two_timescales": sum(p.timescales.formation >= 1 and p.timescales.persistence > p.timescales.formation
                                  for p in real),
            "energy_falls": sum(len(p.energy_violations) > 0 for p in real),
        }

    def summary(self) -> str:
        p = self.provenance
        lines = [
            f"Metastability: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, "
            f"{p.n_tokens} tokens; sphere-projected residual, per prompt",
        ]
        runs = [("model", self)] + [(name, r) for name, r in (("control", self.control), ("repeated", self.repeated)) if r]
        for name, r in runs:
            lines.append(f"[{name}: {r.provenance.model} ({r.provenance.weights}), prompts {r.provenance.prompt_set!r}]")
            for v in judge([r], n_bootstrap=0):
                lines.append(f"  {v.claim:58} {v.measured:30} {v.verdict}")
        lines.append(f"{'state':>5} {'mass>0.9':>9} {'eff.rank':>9} {'clusters':>9} {'noise':>7} {'CKA':>7}"
                     + "".join(f" {'E(b=' + format(b, 'g') + ')':>10}" for b in self.betas)
                     + f" {'ctrl mass':>9} {'ctrl rank':>9}")
        mass, rank, count, noise = (self.mean(n) for n in ("mass_near_one", "effective_rank", "n_clusters", "noise_fraction"))
        cka, energy = self.mean("cka"), self.mean("energy")
        for l in range(len(mass)):
            ctrl = (f" {self.control.mean('mass_near_one')[l]:>9.3f} {self.control.mean('effective_rank')[l]:>9.1f}"
                    if self.control else "")
            lines.append(
                f"{l:>5} {mass[l]:>9.3f} {rank[l]:>9.1f} {count[l]:>9.1f} {noise[l]:>7.2f} "
                f"{cka[l] if l < len(cka) else float('nan'):>7.3f}"
                + "".join(f" {energy[b, l]:>10.4g}" for b in range(len(self.betas))) + ctrl
            )
        for name, r in runs:
            if r.tie_tolerance is not None:
                tied = np.array([m.tied_fraction for m in r.prompts])
                lines.append(f"ties ({name}): tokens within chord {r.tie_tolerance:g} are one point to HDBSCAN; tied tokens "
                             f"per state: mean {tied.mean():.1%}, at state 0 {tied[:, 0].mean():.1%}, max {tied.max():.1%}")
        v = "-" if self.v_radius is None else f"{self.v_radius.min():.2f}..{self.v_radius.max():.2f}"
        lines.append(f"rho(V) {v}; rho(OV) {self.ov_radius.min():.2f}..{self.ov_radius.max():.2f}; "
                     f"complex OV eigenvalues {self.ov_complex_fraction.mean():.1%}")
        if self.fiedler is not None:
            lines.append(f"attention Fiedler value: mean {self.fiedler.mean():.3f} over heads and blocks; "
                         f"mask-only graph {self.fiedler_mask_only:.3f}")
        return "\n".join(lines)

    def figure(self):
        """Mass near one, effective rank, cluster count and E_beta per state: one named line per prompt (the
        model's in colour, the control's grey, repeated tokens red), and per run of >= 2 prompts its median
        with the 5-95% band across prompts."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=2, vertical_spacing=0.14, horizontal_spacing=0.12, subplot_titles=(
            f"mass near one (pairs > {self.mass_threshold})", "effective rank (log axis)",
            f"HDBSCAN clusters (min size {self.min_cluster_size})", "interaction energy E_beta / E_beta(state 0)"))
        panels = (("mass_near_one", 1, 1), ("effective_rank", 1, 2), ("n_clusters", 2, 1), ("energy", 2, 2))
        runs = [(self, None, "model")]
        runs += [(r, c, n) for r, c, n in ((self.control, plots.CONTROL, "control"),
                                           (self.repeated, plots.MODEL_2, "repeated")) if r]
        for r, colour, role in runs:
            curves = {name: np.stack([_curve(m, name) for m in r.prompts]) for name, _, _ in panels}
            for i, label in enumerate(r.prompt_labels):
                line = colour or PROMPT_COLOURS[i % len(PROMPT_COLOURS)]
                # The model's prompts each get an entry; a reference run's lines one between them (hover names each).
                entry = f"{role}: {label}" if r is self else f"{role}: one line per prompt"
                for name, row, col in panels:
                    fig.add_trace(go.Scatter(
                        y=curves[name][i], mode="lines", line={"color": line, "width": 1}, opacity=0.6,
                        name=entry, legendgroup=entry, showlegend=(row, col) == (1, 1) and (r is self or i == 0),
                        hovertemplate=f"{role}: {label}<br>state %{{x}}: %{{y:.3g}}<extra></extra>"), row=row, col=col)
            if len(r.prompts) >= 2:
                for name, row, col in panels:
                    lo, mid, hi = np.quantile(curves[name], [0.05, 0.5, 0.95], axis=0)
                    states = np.arange(len(mid))
                    first = (row, col) == (1, 1)
                    fig.add_trace(plots.band(states, lo, hi, colour or plots.MODEL, f"{role}: 5-95% of prompts",
                                             legendgroup=f"{role}: band", showlegend=first), row=row, col=col)
                    fig.add_trace(go.Scatter(x=states, y=mid, mode="lines", line={"color": colour or plots.MODEL, "width": 3},
                                             name=f"{role}: median of prompts", legendgroup=f"{role}: median",
                                             showlegend=first), row=row, col=col)
        fig.update_yaxes(title_text="share of token pairs", row=1, col=1)
        ranks = [_curve(m, "effective_rank") for r, _, _ in runs for m in r.prompts]
        fig.update_yaxes(type="log", title_text="effective rank (dimensions)", row=1, col=2, **plots.log_ticks(ranks))
        fig.update_yaxes(title_text="clusters (count)", row=2, col=1)
        fig.update_yaxes(title_text=f"E_beta ratio (beta {self.betas[-1]:g})", row=2, col=2)
        fig.update_xaxes(title_text="state l")
        plots.shrink_subplot_titles(fig)
        p = self.provenance
        fig.update_layout(title=f"Metastability on the sphere: {p.model} ({p.weights}), one line per prompt",
                          template="plotly_white", height=820, margin={"r": 20},
                          legend={"x": 1.02, "xanchor": "left", "y": 1, "font": {"size": 10}})
        return fig


# The model's prompts in colour, none red (repeated tokens) or grey (the control): plotly's D3 palette less those.
PROMPT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _curve(metrics: CloudMetrics, name: str) -> Float[np.ndarray, " state"]:
    """One panel's curve of a prompt: the metric per state; the energy at the largest beta over state 0's."""
    if name == "energy":
        return metrics.energy[-1] / metrics.energy[-1, 0]
    return np.asarray(getattr(metrics, name), dtype=np.float64)


METASTABLE = citations.METASTABLE.source


def _share(key: str):
    def test(r) -> tuple[str, bool]:
        c = r.counts()
        return f"{c[key]}/{c['prompts']} prompts", bool(c[key] >= c["prompts"] / 2)
    return test


def _learned(r) -> tuple[str, bool | None]:
    c = r.counts()
    if r.control is None or r.control.provenance.weights != "random":  # a --compare model is not an untrained control
        return f"{c['clustered']}/{c['prompts']} prompts", None
    k = r.control.counts()
    return (f"{c['clustered']}/{c['prompts']} vs control {k['clustered']}/{k['prompts']}",
            bool(c["clustered"] >= c["prompts"] / 2 and k["clustered"] < k["prompts"] / 2))


CLAIMS = (
    Claim(METASTABLE, "tokens cluster", "effective rank halves and clusters remain, in >= half the prompts", _share("clustered")),
    Claim(METASTABLE, "clustering is learned, not wiring", "the model clusters (rule above), the untrained control does not",
          _learned),
    Claim(METASTABLE, "metastable plateaus", f"a CKA >= {CKA_PLATEAU} run over >= 2 blocks, in >= half the prompts",
          _share("plateau")),
    Claim(METASTABLE, "two timescales", "clusters form after state 0 and persist longer than they took to form, "
          "in >= half the prompts", _share("two_timescales")),
    Claim(METASTABLE, "interaction energy is not monotone", "E_beta falls at some block in >= half the prompts",
          _share("energy_falls")),
    Claim(METASTABLE, "collapse speed follows rho(V)", "Spearman(collapse speed, rho(V)) over blocks >= 0.5",
          lambda r: (f"Spearman {r.collapse_vs_v_spearman:+.2f} (OV {r.collapse_vs_ov_spearman:+.2f})",
                     finite(r.collapse_vs_v_spearman >= 0.5, r.collapse_vs_v_spearman)), units="Spearman rho (-1 to 1)"),
)
MetastabilityResult.claims = CLAIMS


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    repeated: bool = True,
    attention_graphs: bool = False,
    betas: tuple[float, ...] = BETAS,
    threshold: float = MASS_THRESHOLD,
    min_cluster_size: int = MIN_CLUSTER_SIZE,
    rtol: float = 1e-6,
    tie_tolerance: float = TIE_TOLERANCE,
    **capture_kwargs,
) -> MetastabilityResult:
    """Metastability of a model on ``prompts`` (or of a ``Capture``, with ``model=`` for the spectra).

    Args:
        control: ``"random"`` (default), a ``MetastabilityResult``, or None.
        repeated: also measure the ``repeated`` prompt set, kept apart as ``result.repeated``.
        attention_graphs: Fiedler values of every head (captures attention patterns; slower).
        betas: inverse temperatures of ``E_beta``; ``rtol``: relative fall counted as a violation.
        tie_tolerance: chord distance on the sphere within which tokens are one point to HDBSCAN.
    """
    if attention_graphs:
        capture_kwargs["attention"] = True
    if not 0.0 <= tie_tolerance < np.inf:
        raise ArgumentError(f"tie_tolerance must be a finite chord distance >= 0, not {tie_tolerance!r}")
    options = dict(betas=tuple(float(b) for b in betas), threshold=threshold, min_cluster_size=min_cluster_size, rtol=rtol,
                   tie_tolerance=float(tie_tolerance))

    def measure_one(cap: Capture, model) -> MetastabilityResult:
        if attention_graphs and cap.attention is None:
            raise ArgumentError("attention_graphs=True needs a capture with attention=True")
        result = _measure_capture(cap, model, attention_graphs=attention_graphs, **options)
        if not repeated:
            return result
        rep_cap = capture_for(model, "repeated", STREAMS, exclude=cap.exclude, attention=attention_graphs)[0]
        repeated_result = _measure_capture(rep_cap, model, attention_graphs=attention_graphs, **options)
        return dataclasses.replace(result, repeated=repeated_result)

    def measure_control(cap: Capture, model) -> MetastabilityResult:  # the control: no graphs, no repeated set
        return _measure_capture(cap, model, attention_graphs=False, **options)

    return measure_with_control("metastability", capture_or_model, prompts, STREAMS, measure_one, model=model,
                                control=control, needs_model="the V and OV spectra read its weights",
                                measure_control=measure_control, **capture_kwargs)


def _measure_capture(cap: Capture, model, betas, threshold, min_cluster_size, rtol, tie_tolerance,
                     attention_graphs) -> MetastabilityResult:
    cap.require_streams(STREAMS)
    if not bool(cap.mask.any()):
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    per_prompt = []
    for p in range(cap.n_prompts):
        keep = cap.mask[p]
        if int(keep.sum()) < 2:
            raise ArgumentError(f"prompt {cap.prompts.labels[p]!r} has fewer than 2 included tokens: nothing to cluster")
        per_prompt.append(cloud_metrics(cap.tokens_of("resid", prompt=p), betas, threshold, min_cluster_size, rtol,
                                        tie_tolerance=tie_tolerance))
    spectra = circuit_spectra(model)
    speed = collapse_speed(per_prompt)
    fiedler_values = mask_only = None
    if attention_graphs:
        fiedler_values, mask_only = _attention_fiedler(cap)
    return MetastabilityResult(
        conventions=Conventions(
            aggregation="per prompt over its included tokens (sphere-projected residual); summaries average prompts",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
            clustering=clustering_convention(min_cluster_size, tie_tolerance),
        ),
        provenance=Provenance.from_capture(cap),
        prompt_labels=cap.prompts.labels,
        prompts=tuple(per_prompt),
        betas=betas,
        mass_threshold=threshold,
        min_cluster_size=min_cluster_size,
        v_radius=spectra.v_radius,
        ov_radius=spectra.ov_radius,
        ov_complex_fraction=spectra.ov_complex_fraction,
        collapse_speed=speed,
        collapse_vs_v_spearman=_spearman(speed, spectra.v_radius),
        collapse_vs_ov_spearman=_spearman(speed, spectra.ov_radius),
        fiedler=fiedler_values,
        fiedler_mask_only=mask_only,
        tie_tolerance=tie_tolerance,
    )


def collapse_speed(clouds: Sequence[CloudMetrics]) -> Float[np.ndarray, " block"]:
    """The rise of the mean (over prompts) ``mass_near_one`` across each block."""
    return np.diff(np.mean([c.mass_near_one for c in clouds], axis=0))


def _spearman(a: np.ndarray, b: np.ndarray | None) -> float:
    if b is None or len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b)[0])


def _attention_fiedler(cap: Capture) -> tuple[np.ndarray, float]:
    attention = cap.require("attention")
    n_blocks, _, n_heads = attention.shape[:3]
    values = np.zeros((n_blocks, n_heads))
    mask_values = []
    for p in range(cap.n_prompts):
        keep = cap.token_mask[p]
        n = int(keep.sum())
        patterns = attention[:, p][:, :, keep][:, :, :, keep].to(torch.float64)  # [block, head, n, n]
        # Read the mask off the patterns: a causal model puts exactly zero above the diagonal.
        causal = bool((patterns.triu(diagonal=1) == 0).all())
        mask_values.append(fiedler(mask_only_attention(n, causal)))
        for l in range(n_blocks):
            for h in range(n_heads):
                values[l, h] += fiedler(patterns[l, h])
    return values / cap.n_prompts, float(np.mean(mask_values))


@dataclass(frozen=True)
class MetastabilityParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    attention_graphs: bool = option(False, "Fiedler value of every head's attention graph (slow)", capture="attention")
    min_cluster_size: int = option(MIN_CLUSTER_SIZE, "HDBSCAN min_cluster_size (min_samples equals it, the point "
                                   "itself not counted)", at_least=2)
    tie_tolerance: float = option(TIE_TOLERANCE, "chord distance on the sphere within which tokens are one point to "
                                  "HDBSCAN (ties)", positive=True)


ANALYSIS = Analysis(
    name="metastability",
    help="clustering on the sphere, CKA plateaus, interaction energy and its violations, V/OV spectra",
    heading="Metastability",
    order=40,
    cost=0.7,
    streams=STREAMS,
    result=MetastabilityResult,
    measure=measure,
    parameters=MetastabilityParameters,
    min_tokens=2,  # each prompt's tokens are clustered: a cloud needs a pair
    # As measure()'s own control: the repeated-token diagnostic and the attention graphs run for the model only.
    reference_keywords={"repeated": False, "attention_graphs": False},
)
