"""Eigen-solvers and spectra: pure linear algebra on operators and weight matrices, in float64.

What ``lensdyn.hooks`` builds from a model (a block's Jacobian as a ``LinearOperator``,
``lensdyn.hooks.jacobian``; the attention weights, ``lensdyn.hooks.circuits``) is solved here:

- ``leading_eigenvalues``: the ``k`` eigenvalues of largest modulus by Arnoldi
  (``scipy.sparse.linalg.eigs``), which finds complex-conjugate leading pairs where power
  iteration oscillates forever, with each pair's residual ``||J v - lambda v|| / ||v||``.
- ``largest_singular_value``: ``sigma_max`` by power iteration on ``J^T J``.

  Both start from a seeded random vector: for a pre-norm block with a centring LayerNorm the
  all-ones vector is an exact eigenvector with eigenvalue 1 (the norm ignores constant shifts),
  a trap for a method that starts there.
- ``circuit_spectra_of``: per block, the eigenvalues of the value map ``V`` and of the OV
  circuit ``OV = sum_h W_V[h] @ W_O[h]`` (row-vector convention, ``lensdyn.hooks.circuits``),
  and each head's OV spectral radius. With grouped-query attention (query head ``h`` reads KV
  head ``h // g``) ``V = U P`` (``U`` the distinct KV heads side by side, ``P`` the duplication)
  has rank at most ``n_kv d_head``, and the nonzero eigenvalues of ``V`` and of ``OV = U P O``
  are those of the small ``P U`` and ``(P O) U`` (equal nonzero spectra of ``AB`` and ``BA``),
  completed by exact zeros.

>>> A = np.diag([3.0, -2.0, 1.0, 0.5])
>>> leading_eigenvalues(LinearOperator((4, 4), matvec=lambda v: A @ v), k=1)[0].real
array([3.])
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import einops
import numpy as np
import torch
from jaxtyping import Complex, Float
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs
from torch import Tensor

from lensdyn.ops import to_numpy


# --- operators: Arnoldi and power iteration ---------------------------------------------------


@dataclass(frozen=True)
class Spectrum:
    """Leading eigenvalues (by modulus) and the largest singular value of one operator."""

    eigenvalues: Complex[np.ndarray, " k"]
    residuals: Float[np.ndarray, " k"]  # ||J v - lambda v|| / ||v|| of each returned pair
    spectral_radius: float
    sigma_max: float
    sigma_iterations: int
    sigma_converged: bool
    matvecs: int
    converged: bool

    @property
    def leading_is_complex(self) -> bool:
        lead = self.eigenvalues[0]
        return bool(abs(lead.imag) > 1e-6 * max(abs(lead), 1e-300))


def leading_eigenvalues(
    op: LinearOperator, k: int = 6, seed: int = 0, tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(eigenvalues, residuals, converged)``: the ``k`` of largest modulus by Arnoldi from a seeded random start.

    >>> A = np.diag([3.0, -2.0, 1.0, 0.5])
    >>> leading_eigenvalues(LinearOperator((4, 4), matvec=lambda v: A @ v), k=2)[0].real
    array([ 3., -2.])
    """
    n = op.shape[0]
    k = min(k, n - 2)
    v0 = np.random.default_rng(seed).standard_normal(n)
    try:
        values, vectors = eigs(op, k=k, which="LM", v0=v0, tol=tol, ncv=min(n, max(2 * k + 1, 20)), maxiter=n * 10)
        converged = True
    except ArpackNoConvergence as err:
        values, vectors, converged = err.eigenvalues, err.eigenvectors, False
    order = np.argsort(-np.abs(values), kind="stable")
    values, vectors = values[order], vectors[:, order]
    residuals = np.array([
        np.linalg.norm(op.matvec(vectors[:, i]) - values[i] * vectors[:, i]) / np.linalg.norm(vectors[:, i])
        for i in range(len(values))
    ])
    return values, residuals, converged


def largest_singular_value(
    op: LinearOperator, iterations: int = 100, tol: float = 1e-6, seed: int = 0
) -> tuple[float, int, bool]:
    """``(sigma_max, iterations used, converged)`` by power iteration on ``J^T J`` from a seeded random start.

    >>> A = np.array([[1.0, 10.0], [0.0, 1.0]])                 # non-normal: rho = 1, sigma_max ~ 10.1
    >>> round(largest_singular_value(LinearOperator((2, 2), matvec=lambda v: A @ v, rmatvec=lambda v: A.T @ v))[0], 6)
    10.09902
    """
    v = np.random.default_rng(seed + 1).standard_normal(op.shape[0])
    v /= np.linalg.norm(v)
    sigma = 0.0
    for i in range(1, iterations + 1):
        w = op.rmatvec(op.matvec(v))
        norm = np.linalg.norm(w)
        if norm == 0:
            return 0.0, i, True
        new_sigma = float(np.sqrt(norm))
        v = w / norm
        if abs(new_sigma - sigma) <= tol * new_sigma:
            return new_sigma, i, True
        sigma = new_sigma
    return sigma, iterations, False


# --- attention weights: V and OV spectra ------------------------------------------------------


@dataclass(frozen=True)
class CircuitSpectra:
    """Eigenvalues and spectral radii of V and OV, per block, computed in float64.

    ``ov_eigenvalues`` are the eigenvalues of ``O @ V`` (``H d_head`` of them), which are the
    nonzero eigenvalues of the ``d_model x d_model`` OV circuit. ``v_*`` are None when V is not square.
    """

    ov_eigenvalues: Complex[np.ndarray, "block rank"]
    ov_radius: Float[np.ndarray, " block"]
    ov_head_radius: Float[np.ndarray, "block head"]
    v_eigenvalues: Complex[np.ndarray, "block d_model"] | None
    v_radius: Float[np.ndarray, " block"] | None

    @property
    def ov_complex_fraction(self) -> Float[np.ndarray, " block"]:
        """Fraction of the nonzero OV eigenvalues off the real axis (relative imaginary part above 1e-9).

        Zeros (the rank deficit of grouped-query attention or ``H d_head < d_model``) are left out:
        they say nothing about rotation.

        >>> eig = np.array([[2.0 + 0j, 1 + 1j, 1 - 1j, 0j]])
        >>> CircuitSpectra(eig, np.abs(eig).max(1), np.ones((1, 2)), None, None).ov_complex_fraction.round(6)
        array([0.666667])
        """
        eig = self.ov_eigenvalues
        nonzero = np.abs(eig) > 1e-12 * np.abs(eig).max(axis=1, keepdims=True)
        off_axis = np.abs(eig.imag) > 1e-9 * np.maximum(np.abs(eig), 1e-300)
        return (off_axis & nonzero).sum(axis=1) / nonzero.sum(axis=1)


def circuit_spectra_of(
    layers: Iterable[tuple[Float[Tensor, "kv d_model d_head"], Float[Tensor, "head d_head d_model"]]],
) -> CircuitSpectra:
    """V and OV spectra of every block from its raw attention weights ``(W_V, W_O)``.

    ``W_V`` holds one matrix per KV head (fewer than ``W_O``'s query heads under grouped-query
    attention; query head ``h`` reads KV head ``h // g``), ``W_O`` one per query head.

    >>> W_V, W_O = 2.0 * torch.eye(2)[None], torch.eye(2)[None]          # one head: OV = V = 2 I
    >>> spectra = circuit_spectra_of([(W_V, W_O)])
    >>> spectra.ov_radius, spectra.v_radius, spectra.ov_head_radius
    (array([2.]), array([2.]), array([[2.]]))
    """
    ov_eig, ov_head, v_eig = [], [], []
    for W_V_kv, W_O_raw in layers:
        shared, grouped_O = _shared_values(W_V_kv, W_O_raw)
        W_O = W_O_raw.to(torch.float64)
        n_heads = W_O.shape[0]
        # One copy of each KV head's W_V per query head that reads it.
        W_V = (W_V_kv if W_V_kv.shape[0] == n_heads else W_V_kv.repeat_interleave(n_heads // W_V_kv.shape[0], dim=0))
        W_V = W_V.to(torch.float64)
        # OV = U (P O) and V = U P, with U the distinct KV heads' values and P the duplication: their
        # nonzero eigenvalues are those of (P O) U and P U, n_kv d_head square (27x cheaper on SmolLM2).
        rank = shared.shape[1]
        ov_eig.append(pad_zeros(to_numpy(torch.linalg.eigvals(grouped_O @ shared)), W_O.shape[0] * W_O.shape[1]))
        head_eig = torch.linalg.eigvals(W_O @ W_V)  # [head, d_head]: each head's W_V[h] @ W_O[h] reversed
        ov_head.append(to_numpy(head_eig.abs().amax(dim=-1)))
        d_model, width = shared.shape[0], W_V.shape[0] * W_V.shape[2]
        if width == d_model:
            group = W_V.shape[0] * W_V.shape[2] // rank
            P_U = einops.reduce(shared, "(kv g d_head) c -> (kv d_head) c", "sum", g=group, d_head=W_V.shape[2])
            v_eig.append(pad_zeros(to_numpy(torch.linalg.eigvals(P_U)), d_model))
        else:
            v_eig.append(None)
    square = all(e is not None for e in v_eig)
    return CircuitSpectra(
        ov_eigenvalues=np.stack(ov_eig),
        ov_radius=np.abs(np.stack(ov_eig)).max(axis=1),
        ov_head_radius=np.stack(ov_head),
        v_eigenvalues=np.stack(v_eig) if square else None,
        v_radius=np.abs(np.stack(v_eig)).max(axis=1) if square else None,
    )


def _shared_values(
    W_V: Float[Tensor, "kv d_model d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> tuple[Float[Tensor, "d_model kv_width"], Float[Tensor, "kv_width d_model"]]:
    """``U``: the distinct KV heads' ``W_V`` side by side; ``P O``: each KV head's query heads' ``W_O`` summed (float64)."""
    W_V, W_O = W_V.to(torch.float64), W_O.to(torch.float64)
    group = W_O.shape[0] // W_V.shape[0]
    shared = einops.rearrange(W_V, "kv d_model d_head -> d_model (kv d_head)")
    grouped_O = einops.reduce(W_O, "(kv g) d_head d_model -> (kv d_head) d_model", "sum", g=group)
    return shared, grouped_O


def pad_zeros(eigenvalues: np.ndarray, size: int) -> np.ndarray:
    """The nonzero eigenvalues of a rank-deficient map, completed by its exact zeros.

    >>> pad_zeros(np.array([2.0 + 1j]), 3)
    array([2.+1.j, 0.+0.j, 0.+0.j])
    """
    return np.concatenate([eigenvalues, np.zeros(size - len(eigenvalues), dtype=eigenvalues.dtype)])
