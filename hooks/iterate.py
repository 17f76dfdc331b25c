"""Depth as time: apply one block to its own output, again and again.

ALBERT shares one layer's weights across depth, so its layer index is an iteration count; the
metastability write-up used it to let the slow timescale play out. ``iterate`` does the same
with any block of any model: start from the state a prompt has at ``block``'s input and apply
``model.blocks[block]`` ``steps`` times (causal, one prompt, no padding).

Rotary models (Llama, Gemma) need their position embeddings passed to a block called on its
own; without them TransformerLens silently skips RoPE. ``iterate`` supplies them from the
checkpoint's own ``rotary_emb``.
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from lensdyn.errors import ArgumentError


def _rotary(model):
    original = getattr(model, "original_model", None)
    if original is None:
        return None
    for name, module in original.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


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
    kwargs = {}
    rotary = _rotary(model)
    if rotary is not None:
        kwargs["position_embeddings"] = rotary(x, torch.arange(x.shape[1], device=device)[None])
    states = [x[0].float().cpu()]
    with torch.inference_mode():
        for _ in range(steps):
            out = model.blocks[block](x, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x[0].float().cpu())
    return torch.stack(states)
