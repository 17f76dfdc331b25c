"""Attention temperature: scale every attention score by an inverse temperature beta.

``temperature_hooks(model, beta)`` returns forward hooks that multiply
``blocks.l.attn.hook_attn_scores`` (the scaled dot products before the softmax) by ``beta``:
``beta = 1`` is the model itself, ``beta -> 0`` uniform attention over what the mask allows,
large ``beta`` near-hard selection. Masked scores stay masked (``-inf * beta = -inf``), so
``beta`` must be positive. Pass the hooks to ``ld.capture(..., fwd_hooks=...)``.
"""
from __future__ import annotations

from torch import Tensor

from lensdyn.errors import ArgumentError


def attention_type(model) -> str:
    """``"MHA"`` (one KV head per query head), ``"MQA"`` (one KV head in all) or ``"GQA"`` (in between)."""
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    return "MHA" if n_kv == n_heads else "MQA" if n_kv == 1 else "GQA"


def temperature_hooks(model, beta: float, layers=None) -> list[tuple[str, object]]:
    """Hooks that scale the attention scores of ``layers`` (default: all) by ``beta``."""
    if not beta > 0:
        raise ArgumentError(f"beta must be positive (masked scores are -inf), not {beta}")

    def scale(scores: Tensor, hook) -> Tensor:
        return scores * beta

    chosen = range(model.cfg.n_layers) if layers is None else layers
    return [(f"blocks.{l}.attn.hook_attn_scores", scale) for l in chosen]
