"""The causal inner product of Park et al. (2024), read off a model's unembedding.

Let ``gamma_v`` be the unembedding vector of token ``v`` (row ``v`` of ``W_U^T``), centred over
the vocabulary, and ``Cov(gamma) = (1/V) sum_v (gamma_v - mean)(gamma_v - mean)^T``. The causal
inner product is ``<x, y>_M = x^T M y`` with ``M = Cov(gamma)^-1``, so
``||h||_M = sqrt(h^T M h) = ||W^T h||`` with the whitener ``W = U diag(1 / sqrt(s + r)) U^T``,
where ``Cov(gamma) = U diag(s) U^T``.

Regularisation: ``r = ridge * mean(s)`` (default ``ridge = 1e-6``), so a direction the
unembedding never uses (``s ~ 0``) gives a large but finite norm instead of a division by
zero. It changes no norm by more than ``ridge`` relative in the directions the vocabulary spans.

Caveats, recorded in every result that uses it: the metric belongs to the space the unembedding
reads, which is *after* the final norm; applying it to raw residual states (as the expansion
write-up did) is a choice, not a derivation. On encoders with an untrained MLM head (minilm-l6)
the metric is that of the tied input embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from lensdyn.ops import token_norms


@dataclass(frozen=True)
class CausalMetric:
    """``M = (Cov(gamma) + r I)^-1`` stored as its whitener ``W`` (``M = W W^T``)."""

    whitener: Float[Tensor, "d_model d_model"]  # float64
    eigenvalues: Float[Tensor, " d_model"]  # of Cov(gamma), ascending
    ridge: float

    @property
    def condition_number(self) -> float:
        """``(s_max + r) / (s_min + r)``: how far M is from a multiple of the identity."""
        r = self.ridge * float(self.eigenvalues.mean())
        return float((self.eigenvalues[-1] + r) / (self.eigenvalues[0] + r))

    def matrix(self) -> Float[Tensor, "d_model d_model"]:
        """The dense ``M`` (for checks; norms use the whitener)."""
        return self.whitener @ self.whitener.T


def causal_metric(unembedding: Float[Tensor, "d_model vocab"], ridge: float = 1e-6) -> CausalMetric:
    """Build the causal metric from ``W_U`` (``[d_model, vocab]``, TransformerLens orientation).

    >>> W_U = torch.tensor([[1., -1., 0., 0.], [0., 0., 2., -2.]])   # gamma = (±1, 0), (0, ±2)
    >>> causal_metric(W_U, ridge=0.0).matrix()                          # Cov = diag(0.5, 2)
    tensor([[2.0000, 0.0000],
            [0.0000, 0.5000]], dtype=torch.float64)
    """
    gamma = unembedding.detach().to(torch.float64).T
    gamma = gamma - gamma.mean(dim=0)
    cov = gamma.T @ gamma / gamma.shape[0]
    s, U = torch.linalg.eigh(cov)
    s = s.clamp(min=0.0)
    r = ridge * float(s.mean())
    whitener = (U / torch.sqrt(s + r)) @ U.T
    return CausalMetric(whitener=whitener, eigenvalues=s, ridge=ridge)


def metric_norms(x: Float[Tensor, "*lead d_model"], metric: CausalMetric | None) -> Float[Tensor, "*lead"]:
    """``||x||_M = ||W^T x||`` per vector (Euclidean when ``metric`` is None), float64 result.

    The projection runs in ``x``'s own dtype (one matmul over every token); norms as ``ops.token_norms``.

    >>> metric_norms(torch.tensor([[1., 1.]]), causal_metric(torch.tensor([[1., -1., 0., 0.], [0., 0., 2., -2.]]), ridge=0.0))
    tensor([1.5811], dtype=torch.float64)
    """
    if metric is None:
        return token_norms(x)
    return token_norms(x @ metric.whitener.to(x.dtype))  # the whitener is symmetric
