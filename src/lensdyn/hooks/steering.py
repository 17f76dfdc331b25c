"""Add vectors to the residual stream: steering at ``blocks.{layer}.hook_resid_pre``.

    with steering(model, vector, layer=10, alpha=4.0):
        logits = model(tokens)          # every position of every row gets 4 * vector before block 10
    # the hook is gone here, also when the body raised

A vector added at ``hook_resid_pre`` of block ``l`` enters the stream before block ``l`` reads
it, so every later block sees it. ``from_position=p`` adds it only at positions ``p`` and after
(the prompt before ``p`` runs unsteered).

For sweeps, ``steering_hooks({layer: rows})`` adds a different vector to every row of a batch,
at several blocks in one forward pass: row ``b`` gets ``rows[b]`` at ``layer`` (zero rows add
nothing). ``steered_last_logits`` runs such a batch and returns each row's last-token logits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn.errors import ArgumentError
from lensdyn.hooks.patching import last_logits


def steering_hooks(
    additions: Mapping[int, Float[Tensor, "*batch d_model"]], from_position: int = 0
) -> list[tuple[str, Callable]]:
    """Forward hooks that add ``additions[l]`` to the input of block ``l`` at positions ``>= from_position``.

    ``additions[l]`` is one vector (``[d_model]``, every row) or one per row (``[batch, d_model]``).

    >>> [name for name, _ in steering_hooks({3: torch.zeros(8)})]
    ['blocks.3.hook_resid_pre']
    """
    if from_position < 0:
        raise ArgumentError(f"from_position must be >= 0, not {from_position}")
    hooks = []
    for layer, vectors in additions.items():
        if not bool(torch.isfinite(vectors).all()):
            raise ArgumentError(f"the steering vector for block {layer} holds NaN or inf")

        def add(x: Tensor, hook, vectors=vectors) -> Tensor:
            if vectors.ndim == 2 and vectors.shape[0] != x.shape[0]:
                raise ArgumentError(f"{vectors.shape[0]} steering rows for a batch of {x.shape[0]}")
            delta = vectors.to(x.device, x.dtype)
            delta = delta[:, None] if delta.ndim == 2 else delta
            x = x.clone()
            x[:, from_position:] += delta
            return x

        hooks.append((f"blocks.{layer}.hook_resid_pre", add))
    return hooks


@contextmanager
def steering(
    model, vector: Float[Tensor, " d_model"], layer: int, alpha: float = 1.0, from_position: int = 0
) -> Iterator[object]:
    """Within the block, every forward pass of ``model`` adds ``alpha * vector`` at ``blocks.{layer}.hook_resid_pre``.

    The hook is removed on exit, whether the body returns or raises; hooks the caller added
    before are left alone.
    """
    _check_layer(model, layer)
    if vector.shape != (model.cfg.d_model,):
        raise ArgumentError(f"steering vector has shape {tuple(vector.shape)}; this model needs ({model.cfg.d_model},)")
    with model.hooks(fwd_hooks=steering_hooks({layer: alpha * vector}, from_position)):
        yield model


def steered_last_logits(
    model,
    tokens: Int[Tensor, "batch pos"],
    last: Int[Tensor, " batch"],
    additions: Mapping[int, Float[Tensor, "batch d_model"]],
    from_position: int = 0,
) -> Float[Tensor, "batch vocab"]:
    """Logits at position ``last[b]`` of each right-padded row ``b``, with ``additions`` steering it."""
    for layer in additions:
        _check_layer(model, layer)
    return last_logits(model, tokens, steering_hooks(additions, from_position), last=last)


def _check_layer(model, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise ArgumentError(f"steering layer {layer} is outside 0..{model.cfg.n_layers - 1} (hook_resid_pre of a block)")
