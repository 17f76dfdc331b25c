"""Fused attention for long prompts: torch's ``scaled_dot_product_attention`` in place of the bridge's reconstruction.

TransformerLens's bridge recomputes attention step by step so that ``hook_attn_scores`` and
``hook_pattern`` fire: per head an ``n x n`` score matrix, masked, soft-maxed in float32, then
multiplied by the values. A capture that reads no attention pattern and no per-head hook needs
none of that, and on a long prompt it is most of the forward pass (smollm2-135m, one 4,096-token
prompt on 2 cores: 52 of 67 s of forward passes were the reconstruction). Within
``fused_attention(model)`` every attention bridge hands its input to the Hugging Face attention
module it wraps, run under ``attn_implementation="sdpa"`` (the whole model builds its masks for
it). The bridge's ``hook_in`` and ``hook_out`` still fire, and so does every hook outside the
attention (the residual stream, the norms, the MLP): a capture reads the same hook points.

The numbers differ from the reconstruction's by float32 round-off (another summation order), so
a capture takes the fused path only where it pays, on batches of at least ``MIN_TOKENS`` positions
(``use_fused_attention``) where nothing is hooked inside the attention (a capture's attention patterns,
a caller's per-head hooks, a ``model.hooks(...)`` on ``hook_pattern``: ``hooked_inside``), and the
shorter prompts every test and report reads are computed exactly as before. It is a fast path (``lensdyn.fastpath``): on first use per model it runs a padded probe
batch both ways and compares every block's residual output; a disagreement above ``TOLERANCE``, or
an attention module that cannot run this way (another signature, softcapping that sdpa lacks), is
one ``FastPathWarning`` and the reconstruction from then on.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformer_lens.hook_points import HookPoint

from lensdyn import fastpath

NAME = "fused attention (sdpa)"
MIN_TOKENS = 1024  # positions in a batch's longest row; below, the reconstruction is cheap and stays exact
TOLERANCE = 1e-4  # of fastpath.disagreement per block output: float32 round-off is ~1e-6, a wrong mask order one
PROBE_LENGTHS = (48, 31)  # a padded batch of two rows: the check covers the padding mask too


def attention_bridges(model) -> list[torch.nn.Module]:
    """The model's attention bridges (each block's ``attn``) whose Hugging Face module can run on its own."""
    attentions = [getattr(block, "attn", None) for block in getattr(model, "blocks", ())]
    return [attn for attn in attentions
            if getattr(attn, "original_component", None) is not None and hasattr(attn, "hook_out")]


@contextmanager
def fused_attention(model):
    """Within: every attention bridge runs its Hugging Face module under sdpa (module docstring); restored after."""
    config = model.original_model.config
    bridges = attention_bridges(model)
    before = config._attn_implementation
    # Straight into the instance's __dict__ (ahead of the class's forward): a bridge's own __setattr__ may pass
    # attributes on to the module it wraps.
    for bridge in bridges:
        vars(bridge)["forward"] = _fused_forward(bridge)
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = before
        for bridge in bridges:
            vars(bridge).pop("forward", None)


def _fused_forward(bridge):
    def forward(*args, **kwargs):
        if "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, args = args[0], args[1:]
        output = bridge.original_component(bridge.hook_in(hidden), *args, **kwargs)
        attended = output[0] if isinstance(output, tuple) else output
        return (bridge.hook_out(attended), None) if isinstance(output, tuple) else bridge.hook_out(attended)

    return forward


def use_fused_attention(model, n_positions: int, needs_attention_hooks: bool) -> bool:
    """Whether a batch of ``n_positions`` positions takes the fused path: long enough, no attention hook wanted,
    and the path checked on this model (``check``, run here on first use)."""
    bridges = attention_bridges(model)
    if needs_attention_hooks or n_positions < MIN_TOKENS or not bridges or any(map(hooked_inside, bridges)):
        return False
    taken = fastpath.verdict(model, NAME)
    return check(model) if taken is None else taken


def hooked_inside(bridge) -> bool:
    """Whether a hook is registered anywhere inside the attention but on the bridge's own ``hook_in``/``hook_out``
    (a caller's ``model.hooks(...)`` on ``hook_pattern``, say): fused, it would never fire."""
    return any(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None)
               for name, module in bridge.named_modules()
               if isinstance(module, HookPoint) and name not in ("hook_in", "hook_out"))


def check(model) -> bool:
    """Run a padded probe batch with and without fused attention; record and return whether every block's output
    agrees to ``TOLERANCE`` (``lensdyn.fastpath``: one warning and the reconstruction otherwise)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.cfg.d_vocab)
    tokens = torch.randint(0, vocab, (len(PROBE_LENGTHS), max(PROBE_LENGTHS)), generator=generator)
    mask = torch.zeros_like(tokens)
    for row, length in enumerate(PROBE_LENGTHS):
        mask[row, :length] = 1
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]

    def outputs() -> torch.Tensor:
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens.to(device), attention_mask=mask.to(device),
                                            names_filter=lambda name: name in names)
        return torch.stack([cache[name][mask.to(device).bool()] for name in names]).double()

    try:
        reference = outputs()
        with fused_attention(model):
            fused = outputs()
    except Exception as err:  # an attention module that takes other arguments, sdpa refusing its options, or a
        # bridge without the per-block hook names the probe reads: the reconstruction, said once
        fastpath.unavailable(model, NAME, f"{type(err).__name__}: {err}".splitlines()[0], warn=True)
        return False
    # Each token relative to its own norm: an attention sink's 10^4 norm would hide an order-one error elsewhere.
    scale = reference.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return fastpath.agrees(model, NAME, fused / scale, reference / scale, tolerance=TOLERANCE)
