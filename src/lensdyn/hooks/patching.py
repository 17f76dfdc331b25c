"""Clean vs edited runs, token alignment between them, and activation patching.

An edit changes a span in the middle of a prompt; everything before it (the common prefix) and
after it (the common suffix) is the same text. ``align`` finds that span from the token ids, so
prompts of different lengths align automatically: position ``p`` of the clean suffix is position
``p + (len_edited - len_clean)`` of the edited one. A target token inside the edited span cannot
be aligned and is an error.

``patch_sweep`` answers "which block carries the edit to the output": for every block ``l`` it
runs the clean prompt with the edited run's activation written in at ``l`` (at the aligned
positions) and returns the logits at the last position. All ``n_layers`` patched runs go through
one forward pass as one batch, row ``l`` patched at block ``l`` only; ``patch_sweeps`` puts the
sweeps of several prompts into that one batch.

In a causal model the positions before the first patched one are the clean run's in every row,
so the sweep computes them once (one short forward pass more), as a Hugging Face key/value
cache, and the rows hold only the rest of the prompt (for a patch at the last token: one
position per row, not the whole prompt). A bridge that keeps no such cache
(TransformerLens-native models) runs the whole prompt per row. The first cached sweep on a model
checks one prompt's rows against whole-prompt rows and, on a disagreement, warns and runs whole
prompts from then on (``lensdyn.fastpath``).

Streams: ``"resid"`` patches ``blocks.l.hook_resid_pre`` (the whole state entering block ``l``),
``"attn_out"`` and ``"mlp_out"`` the sublayer's write.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn.errors import ArgumentError, PromptError
from lensdyn.fastpath import agrees, unavailable, verdict
from lensdyn.hooks.compat import cache_keyword, route_cache_keyword

PATCH_HOOKS = {"resid": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
PREFIX_CACHE = "patch-sweep prefix cache"  # the fast path's name in warnings and ``lensdyn.fastpath.fast_paths``


@dataclass(frozen=True)
class Alignment:
    """Where two token sequences agree: a common prefix, a differing span, a common suffix."""

    clean_length: int
    edited_length: int
    prefix: int  # tokens equal at the start
    suffix: int  # tokens equal at the end (not overlapping the prefix)

    @property
    def offset(self) -> int:
        """Edited position = clean position + offset, for positions in the common suffix."""
        return self.edited_length - self.clean_length

    def edited_position(self, clean_position: int) -> int:
        """The edited run's position of a clean position outside the edit; an error inside it."""
        p = clean_position % self.clean_length
        if p < self.prefix:
            return p
        if p >= self.clean_length - self.suffix:
            return p + self.offset
        raise PromptError(
            f"clean position {p} lies inside the edited span (positions {self.prefix}..{self.clean_length - self.suffix - 1}):"
            " it has no counterpart in the edited prompt"
        )

    def span(self) -> tuple[range, range]:
        """The differing positions: ``(clean range, edited range)``."""
        return range(self.prefix, self.clean_length - self.suffix), range(self.prefix, self.edited_length - self.suffix)


def align(clean: list[int], edited: list[int]) -> Alignment:
    """Common prefix and suffix of two token-id lists.

    >>> a = align([5, 6, 7, 8, 9], [5, 1, 2, 8, 9])
    >>> (a.prefix, a.suffix, a.edited_position(4))
    (1, 2, 4)
    >>> align([5, 6, 9], [5, 1, 1, 6, 9]).edited_position(2)
    4
    """
    if clean == edited:
        raise PromptError("the clean and edited prompts are the same tokens: nothing was edited")
    prefix = 0
    while prefix < min(len(clean), len(edited)) and clean[prefix] == edited[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(clean), len(edited)) - prefix
           and clean[len(clean) - 1 - suffix] == edited[len(edited) - 1 - suffix]):
        suffix += 1
    return Alignment(len(clean), len(edited), prefix, suffix)


class _LastState(Exception):
    """Raised at the last block's output: only the last position's logits are needed, so the pass
    skips the full unembedding (on SmolLM2, 49,152 logits per position dominate a short batch)."""

    def __init__(self, state: Tensor):
        self.state = state


def final_logits(model, state: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch vocab"]:
    """Logits from last-block outputs (before the final norm, the capture's ``resid[n_layers]``): final norm, then unembedding."""
    param = next(model.parameters())
    with torch.inference_mode():
        return model.unembed(model.ln_final(state.to(param.device, param.dtype)[:, None]))[:, -1].float().cpu()


def last_logits(
    model, tokens: Int[Tensor, "batch pos"], fwd_hooks=(), last: Int[Tensor, " batch"] | None = None, **forward_kwargs
) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position of every row (or at ``last[b]`` for right-padded rows), float32 on CPU.

    The final norm and unembedding run on that position only (equal to the full forward's
    logits there to float32 round-off; tested). Causal models only: with right padding, the pad
    tokens after ``last[b]`` cannot change it. ``forward_kwargs`` go to the forward
    (``attention_mask``, the key/value cache).
    """
    device = next(model.parameters()).device
    rows = torch.arange(tokens.shape[0], device=device)
    index = None if last is None else last.to(device)

    def stop(x: Tensor, hook) -> Tensor:
        raise _LastState(x[:, -1] if index is None else x[rows, index])

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.inference_mode():
        try:
            model.run_with_hooks(tokens.to(device), fwd_hooks=[*fwd_hooks, (final, stop)], **forward_kwargs)
        except _LastState as done:
            return final_logits(model, done.state)
    raise RuntimeError(f"{final} never fired")


def patch_sweep(
    model,
    clean_tokens: Int[Tensor, " pos"],
    edited_activations: Float[Tensor, "block pos_edited d_model"],
    clean_positions: list[int],
    edited_positions: list[int],
    stream: str = "resid",
) -> Float[Tensor, "block vocab"]:
    """Logits at the last position of the clean prompt with the edited activation patched in at each block.

    ``edited_activations[l]`` is the edited run's ``stream`` at block ``l``; position
    ``edited_positions[k]`` of it replaces clean position ``clean_positions[k]``.
    """
    return patch_sweeps(model, [clean_tokens], [edited_activations], [clean_positions], [edited_positions], stream)[0]


def patch_sweeps(
    model,
    clean_tokens: Sequence[Tensor],
    edited_activations: Sequence[Tensor],
    clean_positions: Sequence[Sequence[int]],
    edited_positions: Sequence[Sequence[int]],
    stream: str = "resid",
    prefix_cache: bool = True,
) -> Float[Tensor, "prompt block vocab"]:
    """``patch_sweep`` of several prompts (item ``p`` of every argument is prompt ``p``'s) in one batch.

    Row ``p * n_layers + l`` is prompt ``p`` patched at block ``l``; rows are right-padded (with
    the attention mask) and the logits read at each row's last real token. In a causal model
    each prompt is cut at its first patched position ``c_p``: ``tokens[:c_p]`` runs once
    (left-padded, so that every prompt's rest follows its prefix without a gap) and is handed to
    the rows as a key/value cache; the rows hold only ``tokens[c_p:]``. Without a cache
    (``prefix_cache=False``, a bridge that keeps none, or a patch at position 0) every row holds
    its whole prompt. Encoders have no next-token logits and are refused.
    """
    if stream not in PATCH_HOOKS:
        raise ArgumentError(f"stream must be one of {sorted(PATCH_HOOKS)}, not {stream!r}")
    if not (len(clean_tokens) == len(edited_activations) == len(clean_positions) == len(edited_positions) > 0):
        raise ArgumentError("patch_sweeps: give every argument one item per prompt, at least one prompt")
    if any(len(c) != len(e) or not c for c, e in zip(clean_positions, edited_positions)):
        raise ArgumentError("patch positions: give as many edited positions as clean ones, at least one")
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise ArgumentError("patch sweeps read next-token logits at the last position: an encoder (bidirectional "
                            "attention) has none; curvature measures its geometry without patching")
    positions = [[p % len(t) for p in ps] for t, ps in zip(clean_tokens, clean_positions)]
    cuts = [min(ps) for ps in positions]
    whole = [0] * len(clean_tokens)
    if not (prefix_cache and min(cuts) > 0) or verdict(model, PREFIX_CACHE) is False:
        return _sweeps(model, clean_tokens, edited_activations, positions, edited_positions, stream, whole, None)
    route_cache_keyword(model)
    cached = _prefix_cache(model, [t[:c] for t, c in zip(clean_tokens, cuts)])
    if cached is None:
        unavailable(model, PREFIX_CACHE, "the bridge returns no key/value cache", warn=False)
        return _sweeps(model, clean_tokens, edited_activations, positions, edited_positions, stream, whole, None)
    fast = _sweeps(model, clean_tokens, edited_activations, positions, edited_positions, stream, cuts, cached)
    if verdict(model, PREFIX_CACHE) is None:  # first use on this model: one prompt's rows against whole prompts
        reference = _sweeps(model, clean_tokens[:1], edited_activations[:1], positions[:1], edited_positions[:1], stream,
                            whole[:1], None)
        if not agrees(model, PREFIX_CACHE, fast[0], reference[0]):
            return _sweeps(model, clean_tokens, edited_activations, positions, edited_positions, stream, whole, None)
    return fast


def _sweeps(model, clean_tokens, edited_activations, positions, edited_positions, stream, cuts, cached):
    """The batched sweep rows, each prompt cut at ``cuts[p]`` (0: whole prompt) with ``cached`` the prefixes' cache."""
    n_layers, n_prompts = model.cfg.n_layers, len(clean_tokens)
    device = next(model.parameters()).device
    rest = [t[c:] for t, c in zip(clean_tokens, cuts)]
    width = max(len(r) for r in rest)
    tokens = torch.zeros(n_prompts, width, dtype=torch.long)
    mask = torch.zeros(n_prompts, width, dtype=torch.long)
    for p, r in enumerate(rest):
        tokens[p, : len(r)] = r
        mask[p, : len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rest]).repeat_interleave(n_layers)
    # Every prompt's patches flattened: at block l, row first_row[k] + l takes source[l, k] at position rest_position[k].
    first_row = torch.tensor([p * n_layers for p, ps in enumerate(positions) for _ in ps], device=device)
    rest_position = torch.tensor([q - c for ps, c in zip(positions, cuts) for q in ps], device=device)
    source = torch.cat([a[:, e] for a, e in zip(edited_activations, edited_positions)], dim=1).to(device)

    def make(layer: int):
        def hook(x: Tensor, hook) -> Tensor:
            x = x.clone()
            x[first_row + layer, rest_position] = source[layer].to(x.dtype)
            return x

        return hook

    forward_kwargs = {}
    if cached is not None:
        cache, prefix_mask = cached
        cache.batch_repeat_interleave(n_layers)
        # The keyword the Hugging Face model itself takes (``cache`` from transformers 5.24): the bridge passes it through.
        forward_kwargs[cache_keyword(getattr(model, "original_model", model))] = cache
        mask = torch.cat([prefix_mask, mask], 1)
    forward_kwargs["attention_mask"] = mask.repeat_interleave(n_layers, 0).to(device)
    hooks = [(f"blocks.{l}.{PATCH_HOOKS[stream]}", make(l)) for l in range(n_layers)]
    logits = last_logits(model, tokens.repeat_interleave(n_layers, 0), hooks, last=last, **forward_kwargs)
    return logits.reshape(n_prompts, n_layers, -1)


def _prefix_cache(model, prefixes: list[Tensor]) -> tuple[object, Int[Tensor, "prompt prefix"]] | None:
    """``(Hugging Face key/value cache, attention mask)`` of the left-padded prefixes; None if the bridge keeps no cache."""
    width = max(len(p) for p in prefixes)
    tokens = torch.zeros(len(prefixes), width, dtype=torch.long)
    mask = torch.zeros(len(prefixes), width, dtype=torch.long)
    for i, p in enumerate(prefixes):
        tokens[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        _, cache = model(tokens.to(device), attention_mask=mask.to(device), return_type="logits_and_cache")
    return None if cache is None else (cache, mask)
