"""Token clouds on the unit sphere: projection, Gram matrices, inner-product histograms, interaction energy.

The shared math of ``lensdyn.analyses.metastability`` (per prompt, per state) and of the
streaming accumulators ``lensdyn.streaming.HistogramStats`` / ``EnergyStats`` (over a corpus);
both call these functions, so a streamed statistic bins and weighs every pair exactly as the
analysis does. All in float64:

- ``sphere``: ``x_i = h_i / ||h_i||``; ``state_gram``: one state's Gram matrix ``<x_i, x_j>`` (``sphere_gram``), and
  ``cloud_grams`` every state's (``n^2`` float64 each: a long prompt's analysis takes one state at a time).
- ``inner_product_histogram``: fractions of pairs ``i < j`` with ``<x_i, x_j>`` in each bin of
  ``BINS`` (40 equal bins on [-1, 1]).
- ``interaction_energy``: ``E_beta = (1 / (2 beta n^2)) sum_ij exp(beta <x_i, x_j>)``, for the
  inverse temperatures ``BETAS``.
- ``tie_representatives``: tokens that are one point on the sphere up to rounding (chord distance
  ``||x_i - x_j|| = sqrt(2 - 2 <x_i, x_j>)`` at most ``TIE_TOLERANCE``, chained: the connected
  components of that graph) share a representative, the group's lowest index; ``tied_fraction``
  is the share of tokens in a group of two or more. ``TIE_TOLERANCE = 1e-4`` sits between float32
  rounding (one token repeated through smollm2-135m's 30 blocks spreads to a chord of at most
  ~1.4e-5) and geometry (float64 Gram rounding puts ~1e-8 of noise on a chord read off it); it is meant for
  float32 activations: bfloat16 rounding is coarser, raise it there.

>>> grams = cloud_grams(torch.tensor([[[3., 4.], [4., -3.]]]))     # one state, two orthogonal tokens
>>> inner_product_histogram(grams[0], np.array([-1.0, -0.5, 0.5, 1.0]))
array([0., 1., 0.])
"""
from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from lensdyn.errors import ArgumentError
from lensdyn.ops import to_numpy

BINS = np.linspace(-1.0, 1.0, 41)
BETAS = (0.1, 1.0, 2.0, 5.0)
TIE_TOLERANCE = 1e-4


def sphere(x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """``x / ||x||`` in float64.

    >>> sphere(torch.tensor([[3.0, 4.0]]))
    tensor([[0.6000, 0.8000]], dtype=torch.float64)
    """
    return torch.nn.functional.normalize(x.to(torch.float64), dim=-1)


GRAM_BLOCK_ROWS = 1024  # from 2 x this many tokens a Gram is formed by row blocks, its upper triangle only


def state_gram(tokens: Float[Tensor, "n d_model"], out: Float[Tensor, "n n"] | None = None) -> Float[Tensor, "n n"]:
    """The Gram matrix ``<x_i, x_j>`` of one state's sphere-projected tokens ``x_i = h_i / ||h_i||``
    (``sphere_gram`` of ``sphere(tokens)``), written into ``out`` where given.

    >>> state_gram(torch.tensor([[2., 0.], [0., 3.]])).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    # One expression for every Gram: the analysis (state by state) and the accumulators (cloud_grams) form
    # bitwise-equal Grams, so every pair lands in the same histogram bin in both.
    return sphere_gram(sphere(tokens), out)


def sphere_gram(x: Float[Tensor, "n d"], out: Float[Tensor, "n n"] | None = None) -> Float[Tensor, "n n"]:
    """``x x^T``, into ``out`` where given (a long prompt's analysis reuses two buffers: a fresh ``n x n``
    float64 costs its page faults, 40 ms at 4,096 tokens).

    From ``2 GRAM_BLOCK_ROWS`` rows on, the product is taken by ``b`` blocks of about ``GRAM_BLOCK_ROWS``
    rows, each against its own and the later rows only, and every block below the diagonal blocks is the
    mirror of one above: ``(b + 1) / 2b`` of the multiplications (4,096 tokens: 0.135 s, not 0.18 s).
    Each entry is the same sum in another blocking of the BLAS kernel: equal to the one-product Gram
    to ~1e-15 (tested), not bit for bit.

    >>> g = sphere_gram(torch.eye(3, dtype=torch.float64)[:, :2])
    >>> g.tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    n = x.shape[0]
    blocks = n // GRAM_BLOCK_ROWS
    if blocks < 2:
        return torch.matmul(x, x.T, out=out)
    out = x.new_empty(n, n) if out is None else out
    edges = [n * b // blocks for b in range(blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        torch.matmul(x[start:stop], x[start:].T, out=out[start:stop, start:])
        out[stop:, start:stop] = out[start:stop, stop:].T
    return out


def cloud_grams(cloud: Float[Tensor, "state n d_model"]) -> list[Float[Tensor, "n n"]]:
    """Per state, ``state_gram`` of the cloud.

    >>> [g.tolist() for g in cloud_grams(torch.tensor([[[2., 0.], [0., 3.]]]))]
    [[[1.0, 0.0], [0.0, 1.0]]]
    """
    return [state_gram(tokens) for tokens in cloud]


def upper_pair_indices(n: int, device: str | torch.device = "cpu") -> Int[Tensor, " pair"]:
    """Flat indices ``i n + j`` of the pairs ``i < j`` of an ``n x n`` matrix, row by row (``pair_values``).

    >>> upper_pair_indices(3).tolist()
    [1, 2, 5]
    """
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i * n + j


def pair_values(gram: Float[Tensor, "n n"], indices: Int[Tensor, " pair"] | None = None,
                out: Float[Tensor, " pair"] | None = None) -> Float[Tensor, " pair"]:
    """The entries ``<x_i, x_j>`` with ``i < j`` (each pair once), row by row, into ``out`` where given;
    ``indices``: ``upper_pair_indices`` of the Gram's size, where the caller reads many Grams of one size.

    >>> pair_values(torch.tensor([[1., .5, .2], [.5, 1., .3], [.2, .3, 1.]]))
    tensor([0.5000, 0.2000, 0.3000])
    """
    # A gather by flat index: three times faster than a boolean mask over the n^2 entries (4,096 tokens: 34 ms, 106 ms).
    if indices is None:
        indices = upper_pair_indices(gram.shape[0], gram.device)
    return torch.take(gram.reshape(-1), indices, out=out)


def inner_product_histogram(gram: Float[Tensor, "n n"], bins: np.ndarray = BINS) -> Float[np.ndarray, " bin"]:
    """Fraction of pairs ``i < j`` in each bin of ``<x_i, x_j>``.

    >>> inner_product_histogram(torch.eye(3, dtype=torch.float64), np.array([-1.0, 0.5, 1.0]))
    array([1., 0.])
    """
    return pair_histogram(pair_values(gram), bins)


def pair_histogram(values: Float[Tensor, " pair"], bins: np.ndarray = BINS) -> Float[np.ndarray, " bin"]:
    """``inner_product_histogram`` of pair values already read off a Gram (``pair_values``): fraction in each bin.

    >>> pair_histogram(torch.tensor([0.0, 0.9, 1.0]), np.array([-1.0, 0.5, 1.0]))
    array([0.33333333, 0.66666667])
    """
    values = to_numpy(values.clamp(-1.0, 1.0))
    counts, _ = np.histogram(values, bins=bins)
    return counts / max(len(values), 1)


def energy_terms(values: Float[Tensor, "*shape"], beta: float, out: Float[Tensor, "*shape"] | None = None
                 ) -> Float[Tensor, "*shape"]:
    """The terms ``exp(beta <x_i, x_j>)`` of ``E_beta`` for inner products ``values`` (pair values, a diagonal),
    written into ``out`` where given (a long prompt's analysis reuses its buffers state after state).

    >>> energy_terms(torch.zeros(1, dtype=torch.float64), 2.0).tolist()
    [1.0]
    """
    return torch.mul(values, beta, out=out).exp_()


def energy_of_terms(pair_terms: Float[Tensor, " pair"], diagonal_terms: Float[Tensor, " n"], beta: float) -> float:
    """``E_beta = (1 / (2 beta n^2)) sum_ij exp(beta <x_i, x_j>)`` from ``energy_terms`` of the pairs ``i < j``
    (``pair_values``) and of the diagonal: the Gram is symmetric, so each pair's term counts twice, and a
    long prompt's energy takes ``n (n + 1) / 2`` exponentials, not ``n^2``.

    >>> e = torch.full((1,), np.e, dtype=torch.float64)       # two aligned points: every term e
    >>> round(energy_of_terms(e, e.expand(2), 1.0), 6)       # 4 e / (2 * 4) = e / 2
    1.359141
    """
    n = diagonal_terms.shape[0]
    return float((diagonal_terms.sum() + 2.0 * pair_terms.sum()) / (2.0 * beta * n * n))


def interaction_energy(gram: Float[Tensor, "n n"], beta: float) -> float:
    """``E_beta = (1 / (2 beta n^2)) sum_ij exp(beta <x_i, x_j>)`` of one Gram (``energy_of_terms``).

    >>> round(interaction_energy(torch.ones(2, 2, dtype=torch.float64), 1.0), 6)   # all aligned: e / 2
    1.359141
    """
    return energy_of_terms(energy_terms(pair_values(gram), beta), energy_terms(gram.diagonal(), beta), beta)


def tie_representatives(gram: Float[Tensor, "n n"], tolerance: float = TIE_TOLERANCE) -> Int[np.ndarray, " n"]:
    """Each point's representative: the lowest index of its tie group, the connected components of
    the graph joining points ``i, j`` with chord distance ``sqrt(2 - 2 <x_i, x_j>) <= tolerance``.

    Read off the Gram (as ``2 - 2 <x_i, x_j> <= tolerance^2``): its float64 rounding (~1e-16) is far
    below ``tolerance^2`` for any tolerance above ~1e-7, so rounding never decides a tie.

    >>> x = sphere(torch.tensor([[1., 0.], [0., 1.], [1., 1e-6], [0., 1.]]))
    >>> tie_representatives(x @ x.T)
    array([0, 1, 0, 1])
    """
    if not 0.0 <= tolerance < np.inf:
        raise ArgumentError(f"tie tolerance must be a finite chord distance >= 0, not {tolerance!r}")
    threshold = tie_threshold(tolerance)
    tied = to_numpy(gram >= threshold if threshold is not None else (2.0 - 2.0 * gram) <= tolerance * tolerance)
    if tied.sum() <= len(tied):  # each point tied only to itself, the usual case: no graph to search
        return np.arange(len(tied), dtype=np.int64)
    _, group = connected_components(csr_matrix(tied), directed=False)
    first = np.full(group.max() + 1, len(group), dtype=np.int64)
    np.minimum.at(first, group, np.arange(len(group)))
    return first[group]


def tie_threshold(tolerance: float) -> float | None:
    """The least float64 ``c`` with ``2 - 2c <= tolerance^2``, so that ``g >= c`` decides a tie exactly as
    ``2 - 2g <= tolerance^2`` does for every float64 ``g`` in ``[0.5, 2]`` (there ``2 - 2g`` is exact,
    Sterbenz) and below 0.5 (never a tie): one comparison of a long prompt's Gram, not two ``n x n``
    temporaries. None where ``tolerance >= 1`` (ties reach below 0.5).

    >>> c = tie_threshold(1e-4)
    >>> 2 - 2 * c <= 1e-4 * 1e-4 < 2 - 2 * float(np.nextafter(c, 0))
    True
    """
    limit = tolerance * tolerance
    if limit >= 1.0:
        return None
    c = 1.0 - limit / 2
    while 2.0 - 2.0 * c > limit:
        c = float(np.nextafter(c, np.inf))
    while 2.0 - 2.0 * float(np.nextafter(c, -np.inf)) <= limit:
        c = float(np.nextafter(c, -np.inf))
    return c


def tied_fraction(representatives: Int[np.ndarray, " n"]) -> float:
    """Share of points whose tie group (``tie_representatives``) has two or more members.

    >>> tied_fraction(np.array([0, 1, 0, 3]))
    0.5
    """
    sizes = np.bincount(representatives, minlength=len(representatives))
    return float((sizes[representatives] > 1).mean())
