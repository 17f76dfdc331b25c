"""OV circuits and value matrices read from a bridge's attention weights.

TransformerLens multiplies row vectors: a residual ``x`` is moved by head ``h`` along
``x @ W_V[h] @ W_O[h]``. So the per-head OV circuit is the ``d_model x d_model`` matrix
``W_V[h] @ W_O[h]`` (``W_O W_V`` in the column-vector notation of the write-ups; same
eigenvalues), and the layer's total is the sum over heads,
``OV = sum_h W_V[h] @ W_O[h] = V @ O`` with ``V = [W_V[0] ... W_V[H-1]]`` (``d_model x H d_head``)
and ``O`` the heads' ``W_O`` stacked row-wise. Both are returned as ``FactoredMatrix`` so
nothing ``d_model x d_model`` is formed until asked for.

Grouped-query attention (SmolLM2: 9 query heads share 3 KV heads): query head ``h`` reads KV
head ``h // (n_heads / n_kv_heads)``, so ``W_V`` is expanded to one copy per query head. Then
``V = U P`` (``U`` the distinct KV heads side by side, ``P`` the duplication) has rank at most
``n_kv d_head``, and ``circuit_spectra`` takes the nonzero eigenvalues of ``V`` and of ``OV = U P O``
from the small ``P U`` and ``(P O) U`` (equal nonzero spectra of ``AB`` and ``BA``).

The layer's value matrix ``value_matrix(model, l) = V`` is square when
``n_heads * d_head == d_model`` (GPT-2, BERT, SmolLM2); its spectral radius is the metastability
write-up's rho(V). Biases and the pre-attention norm's gain are not folded in: these are the raw
weights, as every lensdyn measurement uses.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import einops
import numpy as np
import torch
from jaxtyping import Complex, Float
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix

from lensdyn.errors import UnsupportedArchitectureError
from lensdyn.metric import CausalMetric, causal_metric


def _value_and_output(model, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head d_model"]]:
    attn = model.blocks[layer].attn
    try:
        W_V, W_O = attn.W_V, attn.W_O
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"block {layer}'s attention exposes no W_V/W_O: {err}") from err
    n_heads = W_O.shape[0]
    if W_V.shape[0] != n_heads:  # grouped-query attention: one KV head serves several query heads
        W_V = W_V.repeat_interleave(n_heads // W_V.shape[0], dim=0)
    return W_V.detach(), W_O.detach()


def ov_circuits(model, layer: int) -> FactoredMatrix:
    """Per-head OV circuits ``W_V[h] @ W_O[h]`` of one layer, shape ``[head, d_model, d_model]``.

    >>> ov = ov_circuits(model, 0)         # doctest: +SKIP
    >>> ov.AB.shape                        # (9, 576, 576) on smollm2-135m
    """
    W_V, W_O = _value_and_output(model, layer)
    return FactoredMatrix(W_V, W_O)


def layer_ov_circuit(model, layer: int) -> FactoredMatrix:
    """The layer's OV circuit summed over heads, ``sum_h W_V[h] @ W_O[h]``, shape ``[d_model, d_model]``."""
    return _sum_over_heads(*_value_and_output(model, layer))


def _sum_over_heads(W_V: Float[Tensor, "head d_model d_head"], W_O: Float[Tensor, "head d_head d_model"]) -> FactoredMatrix:
    # sum_h W_V[h] @ W_O[h] is one product of the heads laid side by side.
    return FactoredMatrix(
        einops.rearrange(W_V, "head d_model d_head -> d_model (head d_head)"),
        einops.rearrange(W_O, "head d_head d_model -> (head d_head) d_model"),
    )


def value_matrix(model, layer: int) -> Float[Tensor, "d_model d_model"]:
    """The layer's value map ``V = [W_V[0] ... W_V[H-1]]`` (one block per query head), when square."""
    V = layer_ov_circuit(model, layer).A
    if V.shape[0] != V.shape[1]:
        raise UnsupportedArchitectureError(
            f"the value map of layer {layer} is {tuple(V.shape)}, not square (n_heads * d_head != d_model); "
            "use the OV circuit instead"
        )
    return V


@dataclass(frozen=True)
class CircuitSpectra:
    """Eigenvalues and spectral radii of V and OV, per layer, computed in float64.

    ``ov_eigenvalues`` are the eigenvalues of ``O @ V`` (``H d_head`` of them), which are the
    nonzero eigenvalues of the ``d_model x d_model`` OV circuit. ``v_*`` are None when V is not square.
    """

    ov_eigenvalues: Complex[np.ndarray, "layer rank"]
    ov_radius: Float[np.ndarray, " layer"]
    ov_head_radius: Float[np.ndarray, "layer head"]
    v_eigenvalues: Complex[np.ndarray, "layer d_model"] | None
    v_radius: Float[np.ndarray, " layer"] | None

    @property
    def ov_complex_fraction(self) -> Float[np.ndarray, " layer"]:
        """Fraction of the nonzero OV eigenvalues off the real axis (relative imaginary part above 1e-9).

        Zeros (the rank deficit of grouped-query attention or ``H d_head < d_model``) are left out:
        they say nothing about rotation.
        """
        eig = self.ov_eigenvalues
        nonzero = np.abs(eig) > 1e-12 * np.abs(eig).max(axis=1, keepdims=True)
        off_axis = np.abs(eig.imag) > 1e-9 * np.maximum(np.abs(eig), 1e-300)
        return (off_axis & nonzero).sum(axis=1) / nonzero.sum(axis=1)


def circuit_spectra(model) -> CircuitSpectra:
    """Eigenvalues of every layer's V and OV, and per-head OV spectral radii (cached per model and weights).

    >>> spectra = circuit_spectra(model)   # doctest: +SKIP
    >>> spectra.ov_radius                  # one spectral radius per layer
    """
    return _cached(model, "circuit_spectra", _circuit_spectra)


def _circuit_spectra(model) -> CircuitSpectra:
    ov_eig, ov_head, v_eig = [], [], []
    for layer in range(model.cfg.n_layers):
        W_V, W_O = (w.to(torch.float64) for w in _value_and_output(model, layer))
        shared, grouped_O = _shared_values(model, layer)
        # OV = U (P O) and V = U P, with U the distinct KV heads' values and P the duplication: their
        # nonzero eigenvalues are those of (P O) U and P U, n_kv d_head square (27x cheaper on SmolLM2).
        rank = shared.shape[1]
        ov_eig.append(_pad(torch.linalg.eigvals(grouped_O @ shared).numpy(), W_O.shape[0] * W_O.shape[1]))
        head_eig = torch.linalg.eigvals(FactoredMatrix(W_V, W_O).BA)  # [head, d_head]
        ov_head.append(head_eig.abs().amax(dim=-1).numpy())
        d_model, width = shared.shape[0], W_V.shape[0] * W_V.shape[2]
        if width == d_model:
            group = W_V.shape[0] * W_V.shape[2] // rank
            P_U = einops.reduce(shared, "(kv g d_head) c -> (kv d_head) c", "sum", g=group, d_head=W_V.shape[2])
            v_eig.append(_pad(torch.linalg.eigvals(P_U).numpy(), d_model))
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


def _shared_values(model, layer: int) -> tuple[Float[Tensor, "d_model kv_width"], Float[Tensor, "kv_width d_model"]]:
    """``U``: the distinct KV heads' ``W_V`` side by side; ``P O``: each KV head's query heads' ``W_O`` summed (float64)."""
    attn = model.blocks[layer].attn
    W_V, W_O = attn.W_V.detach().to(torch.float64), attn.W_O.detach().to(torch.float64)
    group = W_O.shape[0] // W_V.shape[0]
    shared = einops.rearrange(W_V, "kv d_model d_head -> d_model (kv d_head)")
    grouped_O = einops.reduce(W_O, "(kv g) d_head d_model -> (kv d_head) d_model", "sum", g=group)
    return shared, grouped_O


def _pad(eigenvalues: np.ndarray, size: int) -> np.ndarray:
    """The nonzero eigenvalues of a rank-deficient map, completed by its exact zeros."""
    return np.concatenate([eigenvalues, np.zeros(size - len(eigenvalues), dtype=eigenvalues.dtype)])


def unembedding(model) -> Float[Tensor, "d_model vocab"]:
    """The unembedding ``W_U`` (``[d_model, vocab]``), detached; tied models share it with the embedding."""
    try:
        W_U = model.W_U
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"{type(model).__name__} exposes no unembedding W_U: {err}") from err
    if W_U.shape[0] != model.cfg.d_model:
        # ALBERT's head projects the residual to embedding_size first: W_U does not read the residual stream,
        # so neither it nor the causal inner product built from it applies to residual states.
        raise UnsupportedArchitectureError(
            f"the unembedding reads a {W_U.shape[0]}-dimensional space, not the {model.cfg.d_model}-dimensional "
            "residual stream (its head projects first): no causal metric or lens on residual states for this model"
        )
    return W_U.detach()


_CACHE: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _cached(model, name: str, compute):
    """``compute(model)``, remembered per model until any parameter is replaced or edited in place."""
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    store = _CACHE.setdefault(model, {})
    if name not in store or store[name][0] != weights:
        store[name] = (weights, compute(model))
    return store[name][1]


def model_causal_metric(model, ridge: float = 1e-6) -> CausalMetric:
    """``causal_metric(unembedding(model))``, computed once per model, weights and ridge.

    Building it costs a ``[vocab, d_model]`` float64 covariance (half a second on SmolLM2).
    """
    return _cached(model, f"causal_metric(ridge={ridge})", lambda m: causal_metric(unembedding(m), ridge=ridge))
