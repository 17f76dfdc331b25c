"""Depth as time: apply one block to its own output, again and again; and how to call a block on its own.

ALBERT shares one layer's weights across depth, so its block index is an iteration count; the
metastability write-up used it to let the slow timescale play out. ``iterate`` does the same
with any block of any model: start from the state a prompt has at ``block``'s input and apply
``model.blocks[block]`` ``steps`` times (causal, one prompt, no padding).

A block called on its own needs what the model's forward hands it besides the hidden states:
rotary position embeddings (Llama, Gemma; without them TransformerLens silently skips RoPE),
ALiBi biases and the attention mask (BLOOM, Falcon), Gemma 3's per-layer-type embeddings.
``block_inputs`` records exactly those, for a sequence of a given length, from one forward pass
of the model itself (token content does not enter them), so every family is called the way its
own forward calls it.
"""
from __future__ import annotations

import weakref

import torch
from jaxtyping import Float
from torch import Tensor

from lensdyn.errors import ArgumentError

# A block called on its own must not read or grow a key/value cache.
_CACHE_KEYWORDS = ("past_key_values", "cache", "layer_past", "past_key_value")


class _Recorded(Exception):
    """Raised at the last block's input: every block's inputs are recorded by then."""


# model -> ((length, device, dtype), every block's (args, kwargs)): the latest length only, so memory stays
# one set of masks; a Jacobian profile asks for many blocks at one length, each once per pass otherwise.
_RECORDED: "weakref.WeakKeyDictionary[object, tuple[tuple, list]]" = weakref.WeakKeyDictionary()


def block_inputs(model, block: int, length: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` the model's forward passes to ``model.blocks[block]`` besides the hidden states,
    for one unpadded sequence of ``length`` tokens (rotary embeddings, ALiBi, masks, ...).

    One forward pass (up to the last block's input) records them for every block at once; they are
    kept for the model's latest ``length``.

    >>> args, kwargs = block_inputs(model, 2, 10)                         # doctest: +SKIP
    >>> out = model.blocks[2](states[None], *args, **kwargs)              # doctest: +SKIP
    """
    n = model.cfg.n_layers
    if not 0 <= block < n:
        raise ArgumentError(f"block must be in 0..{n - 1}, not {block}")
    param = next(model.parameters())
    key = (length, param.device, param.dtype)
    cached = _RECORDED.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _record_block_inputs(model, length, param.device))
        try:
            _RECORDED[model] = cached
        except TypeError:  # not weakly referenceable: record again next time
            pass
    args, kwargs = cached[1][block]
    return args, dict(kwargs)


def _record_block_inputs(model, length: int, device) -> list[tuple[tuple, dict]]:
    n = model.cfg.n_layers
    recorded: list[tuple[tuple, dict] | None] = [None] * n

    def record(index: int):
        def hook(module, args, kwargs):
            # GPT-2 hands its cache positionally: a cache object anywhere becomes None, or the block would
            # attend to the keys this very pass left in it.
            args = tuple(None if _is_cache(a) else a for a in args[1:])
            kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYWORDS and k != "hidden_states" and not _is_cache(v)}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            recorded[index] = (args, kwargs)
            if index == n - 1:
                raise _Recorded

        return hook

    handles = [model.blocks[l].register_forward_pre_hook(record(l), with_kwargs=True) for l in range(n)]
    try:
        # no_grad, not inference_mode: the recorded tensors enter jvps (lensdyn.hooks.jacobian).
        with torch.no_grad():
            model(torch.zeros(1, length, dtype=torch.long, device=device), return_type=None)
    except _Recorded:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [l for l, r in enumerate(recorded) if r is None]
    if missing:
        raise RuntimeError(f"block(s) {missing} were never called by the model's forward")
    return recorded


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    return isinstance(value, Cache)


def iterate(model, start: Float[Tensor, "pos d_model"], block: int, steps: int) -> Float[Tensor, "step pos d_model"]:
    """States ``x_0 = start, x_{t+1} = block(x_t)`` for ``t < steps`` (``steps + 1`` of them, float32 on CPU).

    >>> cap = ld.capture(model, ["One prompt."], streams=("resid",))            # doctest: +SKIP
    >>> states = iterate(model, cap.resid[3, 0, : cap.token_mask[0].sum()], block=3, steps=60)   # doctest: +SKIP
    """
    if not 0 <= block < model.cfg.n_layers:
        raise ArgumentError(f"block must be in 0..{model.cfg.n_layers - 1}, not {block}")
    if steps < 1:
        raise ArgumentError(f"steps must be at least 1, not {steps}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    x = start.to(device, dtype)[None]
    args, kwargs = block_inputs(model, block, x.shape[1])
    states = [x[0].float().cpu()]
    with torch.inference_mode():
        for _ in range(steps):
            out = model.blocks[block](x, *args, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x[0].float().cpu())
    return torch.stack(states)
