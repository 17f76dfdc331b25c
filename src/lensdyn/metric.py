"""The two causal metrics of ``lensdyn.conventions`` 8, read off a model's unembedding.

Let ``gamma_v`` be the unembedding vector of token ``v`` (row ``v`` of ``W_U^T``), centred over
the vocabulary, and ``Cov(gamma) = (1/V) sum_v (gamma_v - mean)(gamma_v - mean)^T`` (population
normalisation, ``1/V``) ``= U diag(s) U^T``. Park, Choe and Veitch (2024) define the causal inner
product on unembedding vectors as ``g^T Cov(gamma)^-1 g'``; the inner product it induces on
embedding-side vectors (residual states, steering vectors) is ``l^T Cov(gamma) l'``. Both are
offered, by name (``METRICS``): ``<x, y>_M = x^T M y`` with

- ``causal_inverse``: ``M = (Cov(gamma) + r I)^-1``, the unembedding-side product applied to
  residual states, as the FLRW expansion write-up did;
- ``causal_dual``: ``M = Cov(gamma) + r I``, the embedding-side product (Park-consistent for
  residual states).

Each is ``M = (Cov(gamma) + r I)^p`` (``p = -1`` or ``+1``), stored as its symmetric whitener
``W = U diag((s + r)^(p/2)) U^T``, so ``||h||_M = sqrt(h^T M h) = ||W^T h||``. The two share
``r``, so they are exact inverses of each other: ``||Cov l||_inverse = ||l||_dual``.

Regularisation: ``r = ridge * mean(s)`` (default ``ridge = 1e-6``), so a direction the
unembedding never uses (``s ~ 0``) gives a large but finite ``causal_inverse`` norm instead of a
division by zero. It changes no norm by more than ``ridge`` relative in the directions the
vocabulary spans.

Caveats, recorded in every result that uses one (``Conventions.causal_metrics``): the metrics
belong to the space the unembedding reads, which is *after* the final norm, so applying either to
raw residual states is a choice, not a derivation. On encoders with an untrained MLM head
(minilm-l6) the metric is that of the tied input embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lensdyn.errors import ArgumentError
from lensdyn.ops import token_norms

# Name -> the power p of M = (Cov(gamma) + r I)^p.
METRICS = {"causal_inverse": -1, "causal_dual": 1}
METRIC_FORMULAS = {"causal_inverse": "Cov(gamma)^-1", "causal_dual": "Cov(gamma), dual"}


@dataclass(frozen=True)
class CausalMetric:
    """``M = (Cov(gamma) + r I)^p`` (``p = METRICS[name]``) stored as its whitener ``W`` (``M = W W^T``)."""

    whitener: Float[Tensor, "d_model d_model"]  # float64
    eigenvalues: Float[Tensor, " d_model"]  # of Cov(gamma), ascending
    ridge: float
    name: str = "causal_inverse"

    @property
    def condition_number(self) -> float:
        """``(s_max + r) / (s_min + r)``: how far M is from a multiple of the identity (either power)."""
        r = self.ridge * float(self.eigenvalues.mean())
        return float((self.eigenvalues[-1] + r) / (self.eigenvalues[0] + r))

    def matrix(self) -> Float[Tensor, "d_model d_model"]:
        """The dense ``M`` (for checks; norms use the whitener)."""
        return self.whitener @ self.whitener.T


def covariance_spectrum(
    unembedding: Float[Tensor, "d_model vocab"],
) -> tuple[Float[Tensor, " d_model"], Float[Tensor, "d_model d_model"]]:
    """``(s, U)`` with ``Cov(gamma) = U diag(s) U^T`` (float64, ``s`` ascending and clamped at 0): what both metrics share.

    >>> covariance_spectrum(torch.tensor([[1., -1., 0., 0.], [0., 0., 2., -2.]]))[0]   # Cov = diag(0.5, 2)
    tensor([0.5000, 2.0000], dtype=torch.float64)
    """
    gamma = unembedding.detach().to(torch.float64).T
    gamma = gamma - gamma.mean(dim=0)
    s, U = torch.linalg.eigh(gamma.T @ gamma / gamma.shape[0])
    return s.clamp(min=0.0), U


def metric_from_spectrum(
    s: Float[Tensor, " d_model"], U: Float[Tensor, "d_model d_model"], ridge: float = 1e-6, name: str = "causal_inverse"
) -> CausalMetric:
    """The metric ``name`` (``METRICS``) from ``covariance_spectrum``: whitener ``U diag((s + r)^(p/2)) U^T``.

    >>> metric_from_spectrum(torch.tensor([0.5, 2.0]), torch.eye(2), ridge=0.0, name="causal_dual").matrix()
    tensor([[0.5000, 0.0000],
            [0.0000, 2.0000]])
    """
    if name not in METRICS:
        raise ArgumentError(f"causal metric must be one of {sorted(METRICS)}, not {name!r}")
    r = ridge * float(s.mean())
    whitener = (U * (s + r) ** (METRICS[name] / 2)) @ U.T
    return CausalMetric(whitener=whitener, eigenvalues=s, ridge=ridge, name=name)


def causal_metric(
    unembedding: Float[Tensor, "d_model vocab"], ridge: float = 1e-6, name: str = "causal_inverse"
) -> CausalMetric:
    """Build the causal metric ``name`` (``METRICS``) from ``W_U`` (``[d_model, vocab]``, TransformerLens orientation).

    >>> W_U = torch.tensor([[1., -1., 0., 0.], [0., 0., 2., -2.]])   # gamma = (±1, 0), (0, ±2)
    >>> causal_metric(W_U, ridge=0.0).matrix()                          # Cov = diag(0.5, 2)
    tensor([[2.0000, 0.0000],
            [0.0000, 0.5000]], dtype=torch.float64)
    >>> causal_metric(W_U, ridge=0.0, name="causal_dual").matrix()
    tensor([[0.5000, 0.0000],
            [0.0000, 2.0000]], dtype=torch.float64)
    """
    return metric_from_spectrum(*covariance_spectrum(unembedding), ridge=ridge, name=name)


def metric_norms(x: Float[Tensor, "*lead d_model"], metric: CausalMetric | None) -> Float[Tensor, "*lead"]:
    """``||x||_M = ||W^T x||`` per vector (Euclidean when ``metric`` is None), float64 result.

    The projection runs in ``x``'s own dtype (one matmul over every token); norms as ``ops.token_norms``.

    >>> metric_norms(torch.tensor([[1., 1.]]), causal_metric(torch.tensor([[1., -1., 0., 0.], [0., 0., 2., -2.]]), ridge=0.0))
    tensor([1.5811], dtype=torch.float64)
    """
    if metric is None:
        return token_norms(x)
    return token_norms(x @ metric.whitener.to(x.device, x.dtype))  # the whitener is symmetric
