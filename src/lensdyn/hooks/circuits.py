"""OV circuits and value matrices read from a bridge's attention weights.

TransformerLens multiplies row vectors: a residual ``x`` is moved by head ``h`` along
``x @ W_V[h] @ W_O[h]``. So the per-head OV circuit is the ``d_model x d_model`` matrix
``W_V[h] @ W_O[h]`` (``W_O W_V`` in the column-vector notation of the write-ups; same
eigenvalues), and the block's total is the sum over heads,
``OV = sum_h W_V[h] @ W_O[h] = V @ O`` with ``V = [W_V[0] ... W_V[H-1]]`` (``d_model x H d_head``)
and ``O`` the heads' ``W_O`` stacked row-wise. Both are returned as ``FactoredMatrix`` so
nothing ``d_model x d_model`` is formed until asked for.

Grouped-query attention (SmolLM2: 9 query heads share 3 KV heads): query head ``h`` reads KV
head ``h // (n_heads / n_kv_heads)``, so ``W_V`` is expanded to one copy per query head. Then
``V = U P`` (``U`` the distinct KV heads side by side, ``P`` the duplication) has rank at most
``n_kv d_head``. ``circuit_spectra`` reads the weights here and hands them to the core's
``lensdyn.spectra.circuit_spectra_of``, which takes the nonzero eigenvalues of ``V`` and of
``OV = U P O`` from the small ``P U`` and ``(P O) U`` (equal nonzero spectra of ``AB`` and ``BA``).

The block's value matrix ``value_matrix(model, l) = V`` is square when
``n_heads * d_head == d_model`` (GPT-2, BERT, SmolLM2); its spectral radius is the metastability
write-up's rho(V). Biases and the pre-attention norm's gain are not folded in: these are the raw
weights, as every lensdyn measurement uses.
"""
from __future__ import annotations

import weakref

import einops
from jaxtyping import Float
from torch import Tensor
from transformer_lens.FactoredMatrix import FactoredMatrix

from lensdyn.errors import UnsupportedArchitectureError
from lensdyn.metric import CausalMetric, covariance_spectrum, metric_from_spectrum
from lensdyn.spectra import CircuitSpectra, circuit_spectra_of


def _attention_weights(model, layer: int) -> tuple[Float[Tensor, "kv d_model d_head"], Float[Tensor, "head d_head d_model"]]:
    """The raw ``(W_V, W_O)`` of block ``layer``, detached: ``W_V`` per KV head, ``W_O`` per query head."""
    attn = model.blocks[layer].attn
    try:
        W_V, W_O = attn.W_V, attn.W_O
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"block {layer}'s attention exposes no W_V/W_O: {err}") from err
    return W_V.detach(), W_O.detach()


def _value_and_output(model, layer: int) -> tuple[Float[Tensor, "head d_model d_head"], Float[Tensor, "head d_head d_model"]]:
    W_V, W_O = _attention_weights(model, layer)
    n_heads = W_O.shape[0]
    if W_V.shape[0] != n_heads:  # grouped-query attention: one KV head serves several query heads
        W_V = W_V.repeat_interleave(n_heads // W_V.shape[0], dim=0)
    return W_V, W_O


def ov_circuits(model, layer: int) -> FactoredMatrix:
    """Per-head OV circuits ``W_V[h] @ W_O[h]`` of block ``layer``, shape ``[head, d_model, d_model]``.

    >>> ov = ov_circuits(model, 0)         # doctest: +SKIP
    >>> ov.AB.shape                        # (9, 576, 576) on smollm2-135m
    """
    W_V, W_O = _value_and_output(model, layer)
    return FactoredMatrix(W_V, W_O)


def layer_ov_circuit(model, layer: int) -> FactoredMatrix:
    """Block ``layer``'s OV circuit summed over heads, ``sum_h W_V[h] @ W_O[h]``, shape ``[d_model, d_model]``."""
    return _sum_over_heads(*_value_and_output(model, layer))


def _sum_over_heads(W_V: Float[Tensor, "head d_model d_head"], W_O: Float[Tensor, "head d_head d_model"]) -> FactoredMatrix:
    # sum_h W_V[h] @ W_O[h] is one product of the heads laid side by side.
    return FactoredMatrix(
        einops.rearrange(W_V, "head d_model d_head -> d_model (head d_head)"),
        einops.rearrange(W_O, "head d_head d_model -> (head d_head) d_model"),
    )


def value_matrix(model, layer: int) -> Float[Tensor, "d_model d_model"]:
    """Block ``layer``'s value map ``V = [W_V[0] ... W_V[H-1]]`` (one block per query head), when square."""
    V = layer_ov_circuit(model, layer).A
    if V.shape[0] != V.shape[1]:
        raise UnsupportedArchitectureError(
            f"the value map of layer {layer} is {tuple(V.shape)}, not square (n_heads * d_head != d_model); "
            "use the OV circuit instead"
        )
    return V


def circuit_spectra(model) -> CircuitSpectra:
    """Eigenvalues of every block's V and OV, and per-head OV spectral radii (cached per model and weights).

    >>> spectra = circuit_spectra(model)   # doctest: +SKIP
    >>> spectra.ov_radius                  # one spectral radius per block
    """
    return _cached(model, "circuit_spectra", _circuit_spectra)


def _circuit_spectra(model) -> CircuitSpectra:
    return circuit_spectra_of(_attention_weights(model, layer) for layer in range(model.cfg.n_layers))


def unembedding(model) -> Float[Tensor, "d_model vocab"]:
    """The unembedding ``W_U`` (``[d_model, vocab]``), detached; tied models share it with the embedding."""
    try:
        W_U = model.W_U
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"{type(model).__name__} exposes no unembedding W_U: {err}") from err
    d_model = getattr(getattr(model, "cfg", None), "d_model", W_U.shape[0])
    if W_U.shape[0] != d_model:
        # ALBERT's head projects the residual to embedding_size first: W_U does not read the residual stream,
        # so neither it nor the causal inner product built from it applies to residual states.
        raise UnsupportedArchitectureError(
            f"the unembedding reads a {W_U.shape[0]}-dimensional space, not the {d_model}-dimensional "
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


def model_causal_metric(model, ridge: float = 1e-6, name: str = "causal_inverse") -> CausalMetric:
    """``causal_metric(unembedding(model), ridge, name)``, computed once per model, weights, ridge and name.

    The ``[vocab, d_model]`` float64 covariance (seconds on SmolLM2) is computed once for both metrics.
    """
    spectrum = _cached(model, "unembedding_covariance_spectrum", lambda m: covariance_spectrum(unembedding(m)))
    return _cached(model, f"causal_metric(ridge={ridge}, name={name})",
                   lambda m: metric_from_spectrum(*spectrum, ridge=ridge, name=name))
