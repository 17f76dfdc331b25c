"""Clean vs edited runs, token alignment between them, and activation patching.

An edit changes a span in the middle of a prompt; everything before it (the common prefix) and
after it (the common suffix) is the same text. ``align`` finds that span from the token ids, so
prompts of different lengths align automatically: position ``p`` of the clean suffix is position
``p + (len_edited - len_clean)`` of the edited one. A target token inside the edited span cannot
be aligned and is an error.

``patch_sweep`` answers "which layer carries the edit to the output": for every block ``l`` it
runs the clean prompt with the edited run's activation written in at ``l`` (at the aligned
positions) and returns the logits at the last position. All ``n_layers`` patched runs go through
one forward pass as one batch, row ``l`` patched at block ``l`` only.

Streams: ``"resid"`` patches ``blocks.l.hook_resid_pre`` (the whole state entering block ``l``),
``"attn_out"`` and ``"mlp_out"`` the sublayer's write.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn.errors import ArgumentError, PromptError

PATCH_HOOKS = {"resid": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


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
    model, tokens: Int[Tensor, "batch pos"], fwd_hooks=(), last: Int[Tensor, " batch"] | None = None
) -> Float[Tensor, "batch vocab"]:
    """Logits at the last position of every row (or at ``last[b]`` for right-padded rows), float32 on CPU.

    The final norm and unembedding run on that position only (equal to the full forward's
    logits there to float32 round-off; tested). Causal models only: with right padding, the pad
    tokens after ``last[b]`` cannot change it.
    """
    device = next(model.parameters()).device
    rows = torch.arange(tokens.shape[0], device=device)
    index = None if last is None else last.to(device)

    def stop(x: Tensor, hook) -> Tensor:
        raise _LastState(x[:, -1] if index is None else x[rows, index])

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.inference_mode():
        try:
            model.run_with_hooks(tokens.to(device), fwd_hooks=[*fwd_hooks, (final, stop)])
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
    if stream not in PATCH_HOOKS:
        raise ArgumentError(f"stream must be one of {sorted(PATCH_HOOKS)}, not {stream!r}")
    if len(clean_positions) != len(edited_positions) or not clean_positions:
        raise ArgumentError("patch positions: give as many edited positions as clean ones, at least one")
    n_layers = model.cfg.n_layers
    device = next(model.parameters()).device
    batch = clean_tokens.to(device)[None].expand(n_layers, -1)
    source = edited_activations[:, edited_positions].to(device)  # [block, k, d_model]
    clean_index = torch.tensor(clean_positions, device=device)

    def make(layer: int):
        def hook(x: Tensor, hook) -> Tensor:
            x = x.clone()
            x[layer, clean_index] = source[layer].to(x.dtype)
            return x

        return hook

    return last_logits(model, batch, [(f"blocks.{l}.{PATCH_HOOKS[stream]}", make(l)) for l in range(n_layers)])
