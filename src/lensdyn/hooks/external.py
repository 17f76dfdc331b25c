"""Bring your own activations: a ``Capture`` from a TransformerLens ``ActivationCache`` or from Hugging Face hidden states.

Both read activations the user already has, under the conventions ``capture()`` keeps
(``lensdyn.conventions``, 1, 3, 7 and 9):

- **which states**: state ``l < n_layers`` is ``blocks.l.hook_resid_pre``, state ``n_layers`` the
  last block's output *before* the final norm. Hugging Face's ``hidden_states`` tuple has
  ``n_layers + 1`` entries, the last of them *after* the final norm on decoders with one (Llama,
  GPT-2, Gemma, ...): it is not a state. ``from_hidden_states`` asks which it is (``final=``) or, given
  a model with a final norm, tells by reading the last entry back through that norm's gain and bias
  (``normalised_tokens``); it never assumes. A post-norm last entry needs the norm's *input*
  (``last_state=``) to make state ``n_layers``.
- **padding**: the attention mask says which positions are real; left or right padding alike, the
  real tokens are packed in order (``Capture.packed``), as ``capture()`` stores them.
- **exclusions**: ``exclude`` as in ``capture()`` (``"massive"`` reads the residual states given).
- **the same model**: shapes are checked against the model (blocks, ``d_model``, batch and
  positions), a cache made by another model object is refused, and by default (``check=True``)
  the first prompt is run again through the model with ``capture()`` and every stream compared: a
  cache of other weights (TransformerLens' ``fold_ln``/centering), other tokens, or a different
  checkpoint fails here, not as a silently wrong number later.

A stream the source does not hold is absent from the capture, and an analysis that needs it is told
which hook (or stream) was missing (``Capture.require_streams``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lensdyn.errors import ArgumentError, PromptError
from lensdyn.hooks.capture import EXCLUDE_RULES, STREAMS, Capture, _excluded, _str_tokens, _tokenize, capture
from lensdyn.models import block_layout, model_info
from lensdyn.ops import massive_mask
from lensdyn.prompts import PromptSet

FINAL = ("post_norm", "pre_norm")
# Relative tolerance of check=True: batching and padding move float32 activations by ~1e-6 of their scale.
CHECK_RTOL = 1e-4


def stream_hook_names(model, n_layers: int) -> dict[str, list[str]]:
    """Stream -> the hook point of each of its entries (per state for ``resid``, per block otherwise).

    Post-norm ``attn_out`` is derived (``ln1.hook_in - hook_resid_pre``, as ``capture()`` does): its entry
    names the ``ln1.hook_in`` it is read from.
    """
    layout = block_layout(model)
    per_block = [layout.stream_hooks(b) for b in range(n_layers)]
    names = {"resid": [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]}
    for stream in STREAMS[1:]:
        if stream in per_block[0]:
            names[stream] = [hooks[stream] for hooks in per_block]
    return names


def from_activation_cache(
    cache,
    model,
    tokens,
    *,
    attention_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | None = None,
    streams: Sequence[str] | None = None,
    exclude: Sequence[str] = ("first",),
    prepend_bos: bool | None = None,
    check: bool = True,
) -> Capture:
    """A ``Capture`` from ``cache`` (``logits, cache = model.run_with_cache(tokens)``) under lensdyn's conventions.

    Args:
        cache: a TransformerLens ``ActivationCache`` (or any mapping hook name -> ``[batch, pos, ...]``).
        model: the bridge that ran it (``ld.load_model``); its block layout says which hook holds which stream.
        tokens: the token ids it ran (int tensor ``[batch, pos]`` or int lists), or the prompts as text,
            tokenised as ``capture()`` does (``prepend_bos``): they must give the cache's positions.
        attention_mask: which positions were real (``[batch, pos]``), when the batch was padded.
        streams: the streams to read; None: every stream whose hooks the cache holds on every block.
            A named stream the cache lacks is an error naming the hook.
        exclude, prepend_bos: as in ``capture()``.
        check: run the first prompt through ``model`` with ``capture()`` and compare every stream.

    >>> logits, cache = model.run_with_cache(tokens)                       # doctest: +SKIP
    >>> cap = ld.Capture.from_activation_cache(cache, model, tokens)       # doctest: +SKIP
    >>> ld.analyses.norms.measure(cap, control=None).mean                  # doctest: +SKIP
    """
    made_by = getattr(cache, "model", None)
    if made_by is not None and made_by is not model:
        raise ArgumentError(f"this ActivationCache was made by another model ({model_info(made_by).name}), not "
                            f"{model_info(model).name}: pass the model that ran it")
    n_layers = model.cfg.n_layers
    held = set(cache.keys())
    cached_layers = {int(k.split(".")[1]) for k in held if k.startswith("blocks.")}
    if cached_layers and max(cached_layers) >= n_layers:
        raise ArgumentError(f"the cache holds block {max(cached_layers)} but {model_info(model).name} has {n_layers} "
                            "blocks: it is from a different model")
    hooks = stream_hook_names(model, n_layers)
    post_norm = block_layout(model).name == "post-norm"
    wanted = tuple(streams) if streams is not None else tuple(s for s in STREAMS if s in hooks)
    _check_stream_names(wanted)
    needs = {s: hooks.get(s, []) + (hooks["resid"][:-1] if post_norm and s == "attn_out" else []) for s in wanted}
    absent = tuple(s for s in STREAMS if s not in hooks)
    lacking = {s: next(h for h in names if h not in held) for s, names in needs.items()
               if s not in absent and any(h not in held for h in names)}
    if streams is not None and lacking:
        stream, hook = next(iter(lacking.items()))
        raise ArgumentError(f"the cache has no {hook!r} (stream {stream!r}): run_with_cache with a names_filter "
                            f"that keeps it, or leave {stream!r} out of streams=")
    padded = {}
    for stream in wanted:
        if stream in absent or stream in lacking:
            continue
        entries = [_batch_first(cache[h]) for h in hooks[stream]]
        if post_norm and stream == "attn_out":  # what LN1 reads minus the residual it was added to
            entries = [x - _batch_first(cache[pre]) for x, pre in zip(entries, hooks["resid"][:-1])]
        if stream.endswith("_scale"):
            entries = [x.squeeze(-1) for x in entries]
        padded[stream] = torch.stack(entries)
    if not padded:
        raise ArgumentError(f"the cache holds none of lensdyn's streams ({', '.join(STREAMS)}): hook points such as "
                            f"{hooks['resid'][0]!r} are missing")
    missing = {s: f"the ActivationCache has no {h!r}: run_with_cache keeping it" for s, h in lacking.items()}
    return _assemble(model, padded, tokens, attention_mask, exclude=exclude, prepend_bos=prepend_bos, check=check,
                     absent=absent, missing=missing, source="the ActivationCache")


def from_hidden_states(
    hidden_states: Sequence[Float[Tensor, "batch pos d_model"]] | Float[Tensor, "entry batch pos d_model"],
    model,
    input_ids,
    attention_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | None = None,
    *,
    final: str | None = None,
    last_state: Float[Tensor, "batch pos d_model"] | None = None,
    exclude: Sequence[str] = ("first",),
    prepend_bos: bool | None = None,
    check: bool = True,
) -> Capture:
    """A ``Capture`` holding ``resid`` from Hugging Face's ``output_hidden_states=True`` (``n_layers + 1`` entries).

    Args:
        hidden_states: ``outputs.hidden_states`` (a tuple of ``[batch, pos, d_model]``, or them stacked).
        model: the lensdyn bridge of the same checkpoint (``ld.load_model``): blocks, tokenizer, final norm.
        input_ids, attention_mask: what the Hugging Face model was given (ids, or text as in ``from_activation_cache``).
        final: what the last entry is: ``"post_norm"`` (after the final norm: Llama, GPT-2, Gemma, ...) or
            ``"pre_norm"`` (the last block's output: encoders without a final norm, or a tuple you built).
            None: read off the entry with the model's final norm (``normalised_tokens``); an entry that is
            neither is an error. A ``final`` the entry contradicts is an error too.
        last_state: with a post-norm last entry, the final norm's input ``[batch, pos, d_model]``
            (state ``n_layers``, which the tuple lacks): e.g. from
            ``hf_model.model.norm.register_forward_pre_hook(lambda m, a: saved.append(a[0]))``.
        exclude, prepend_bos, check: as in ``from_activation_cache`` (``check`` compares ``resid``).

    >>> out = hf_model(ids, attention_mask=mask, output_hidden_states=True)                     # doctest: +SKIP
    >>> cap = ld.Capture.from_hidden_states(out.hidden_states, model, ids, mask, last_state=saved[0])  # doctest: +SKIP
    """
    entries = list(hidden_states.unbind(0) if isinstance(hidden_states, Tensor) else hidden_states)
    n_layers, name = model.cfg.n_layers, model_info(model).name
    if len(entries) != n_layers + 1:
        raise ArgumentError(f"{len(entries)} hidden states for {name}'s {n_layers} blocks: Hugging Face's tuple has "
                            f"n_layers + 1 = {n_layers + 1} entries (is it another model's?)")
    if final is not None and final not in FINAL:
        raise ArgumentError(f"final must be one of {FINAL} or None (read it off the model's final norm), not {final!r}")
    norm = getattr(model, "ln_final", None) if "ln_final.hook_in" in model.hook_dict else None
    if norm is None:
        if final == "post_norm":
            raise ArgumentError(f"final='post_norm', but {name} has no final norm: its last hidden state is the last "
                                "block's output (final='pre_norm')")
        final = "pre_norm"
    else:
        mask = _real_positions(entries[-1].shape[:2], attention_mask)
        share = float(normalised_tokens(entries[-1][mask], norm).float().mean())
        read = "post_norm" if share == 1.0 else "pre_norm" if share == 0.0 else None
        if read is None:
            raise ArgumentError(f"the last hidden state is a normalised vector on {share:.0%} of the real tokens: "
                                "neither the final norm's output nor its input; say which with final=")
        if final is not None and final != read:
            raise ArgumentError(f"final={final!r}, but the last hidden state is the final norm's "
                                f"{'output' if read == 'post_norm' else 'input'} (final={read!r})")
        final = read
    if final == "post_norm":
        if last_state is None:
            raise ArgumentError(
                "the last hidden state is after the final norm, not a state (lensdyn.conventions, 1): pass the final "
                "norm's input as last_state= (a forward pre-hook on the Hugging Face model's final norm saves it)")
        entries[-1] = last_state
    elif last_state is not None:
        raise ArgumentError("last_state= replaces a post-norm last hidden state; this one is already the last block's "
                            "output")
    resid = torch.stack([_batch_first(e) for e in entries])
    if resid.shape[-1] != model.cfg.d_model:
        raise ArgumentError(f"hidden states of width {resid.shape[-1]}, but {name} has d_model {model.cfg.d_model}")
    missing = {s: "Hugging Face hidden states hold the residual states only: use from_activation_cache or capture()"
               for s in STREAMS[1:]}
    return _assemble(model, {"resid": resid}, input_ids, attention_mask, exclude=exclude, prepend_bos=prepend_bos,
                     check=check, absent=(), missing=missing, source="the hidden states")


def normalised_tokens(
    y: Float[Tensor, "token d_model"], norm, tolerance: float = 1e-3
) -> Bool[Tensor, " token"]:
    """Which rows of ``y`` are outputs of ``norm`` (a LayerNorm or RMSNorm ``x -> g * n(x) + b``, ``n(x)`` of unit RMS).

    ``b = norm(0)`` and ``g = (norm(s) - b) / s`` for a probe ``s`` of mean 0 and RMS 1 (which both norms
    leave as is); a row is an output where ``z = (y - b) / g`` has RMS within ``tolerance`` of 1. A
    residual state with unit RMS after that map on every token would be a coincidence.

    >>> norm = torch.nn.LayerNorm(6)
    >>> x = torch.randn(3, 6) * 5
    >>> normalised_tokens(norm(x).detach(), norm).tolist(), normalised_tokens(x, norm).tolist()
    ([True, True, True], [False, False, False])
    """
    d = y.shape[-1]
    weight = next(iter(norm.parameters()), torch.empty(0))  # the probes go where the norm runs
    probe = torch.tensor([1.0, -1.0], device=weight.device).repeat(d // 2 + 1)[:d]
    probe = (probe - probe.mean()) / probe.std(unbiased=False)
    with torch.no_grad():
        bias = norm(torch.zeros(1, d, dtype=weight.dtype, device=weight.device))[0].double()
        gain = (norm(probe[None].to(weight.dtype))[0].double() - bias) / probe.double()
    bias, gain = bias.cpu(), gain.cpu()
    usable = gain.abs() > 1e-6  # a coordinate the norm zeroes says nothing
    z = (y.double().cpu() - bias)[:, usable] / gain[usable]
    return (z.pow(2).mean(-1).sqrt() - 1).abs() < tolerance


def _assemble(model, padded: Mapping[str, Tensor], tokens, attention_mask, *, exclude, prepend_bos, check, absent,
              missing: Mapping[str, str], source: str) -> Capture:
    """The Capture of ``padded`` streams ``[state or block, batch, pos, ...]`` on ``tokens`` (the shared checks)."""
    bad_rules = set(exclude) - set(EXCLUDE_RULES)
    if bad_rules:
        raise ArgumentError(f"unknown exclude rule(s) {sorted(bad_rules)}: choose from {', '.join(EXCLUDE_RULES)}")
    name, d_model = model_info(model).name, model.cfg.d_model
    shape = next(iter(padded.values())).shape[1:3]
    for stream, value in padded.items():
        if value.shape[1:3] != shape or (not stream.endswith("_scale") and value.shape[-1] != d_model):
            raise ArgumentError(f"{source}: {stream!r} has shape {tuple(value.shape[1:])}, expected {tuple(shape)} "
                                f"positions{'' if stream.endswith('_scale') else f' x d_model {d_model} ({name})'}")
    user_mask = _real_positions(shape, attention_mask)
    if prepend_bos is None:
        prepend_bos = model_info(model).prepend_bos
    prompt_set, token_lists = _token_lists(model, tokens, user_mask, prepend_bos, source)
    lengths = [len(t) for t in token_lists]
    if lengths != user_mask.sum(1).tolist():
        raise ArgumentError(f"{source} has {user_mask.sum(1).tolist()} real positions per prompt but the tokens have "
                            f"{lengths}: pass the token ids that were run (and the attention mask of a padded batch)")
    token_tensor = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    token_mask = torch.zeros_like(token_tensor, dtype=torch.bool)
    for i, ids in enumerate(token_lists):
        token_tensor[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        token_mask[i, : len(ids)] = True
    user_mask = user_mask.to(next(iter(padded.values())).device)
    # Real positions in (prompt, position) order, left or right padded alike: the capture's packed order.
    packed = {s: v[:, user_mask].detach().cpu() for s, v in padded.items()}
    mask = token_mask & ~_excluded(model, token_tensor, token_mask, exclude)
    massive_positions: tuple[tuple[int, int], ...] = ()
    if "massive" in exclude:
        if "resid" not in packed:
            raise ArgumentError(f"exclude='massive' reads the residual states, and {source} holds no 'resid'")
        flagged = torch.stack([massive_mask(state).any(-1) for state in packed["resid"]]).any(0)
        massive_positions = tuple(map(tuple, token_mask.nonzero()[flagged].tolist()))
        for prompt, position in massive_positions:
            mask[prompt, position] = False
    if not bool(mask.any()):
        raise PromptError(f"no token left to measure: exclude={tuple(exclude)} removes every token; exclude=()")
    info = model_info(model)
    cap = Capture(tokens=token_tensor, token_mask=token_mask, mask=mask, str_tokens=_str_tokens(model, token_lists),
                  prompts=prompt_set, model_info=info, exclude=tuple(exclude), truncated=(), n_layers=model.cfg.n_layers,
                  packed=packed, absent=absent, massive_positions=massive_positions,
                  massive_source=f"{info.name} ({info.weights})" if "massive" in exclude else "", missing=dict(missing))
    if check:
        _check_against_model(cap, model, token_lists[0], source)
    return cap


def _check_against_model(cap: Capture, model, ids: list[int], source: str) -> None:
    """Run prompt 0 through ``model`` with ``capture()``; every stream of ``cap`` must agree (``CHECK_RTOL``)."""
    ref = capture(model, [ids], streams=tuple(cap.packed), exclude=(), store_device="cpu")  # where cap's streams are
    for stream in cap.packed:
        mine, theirs = cap.prompt_of(stream, 0).double(), ref.prompt_of(stream, 0).double()
        gap, scale = float((mine - theirs).abs().max()), float(theirs.abs().max())
        if gap > CHECK_RTOL * scale:
            raise ArgumentError(
                f"{source}: {stream!r} of prompt 0 differs from {model_info(model).name}'s own pass on the same tokens "
                f"by up to {gap:.3g} (scale {scale:.3g}): another model or checkpoint, other tokens, or other weights "
                "(TransformerLens' fold_ln / centering)? check=False skips this comparison")


def _token_lists(model, tokens, user_mask: Tensor, prepend_bos, source: str) -> tuple[PromptSet, list[list[int]]]:
    """The prompt set and each prompt's real token ids: from ids ``[batch, pos]`` (read through the mask) or text."""
    if isinstance(tokens, Tensor):
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tuple(tokens.shape) != tuple(user_mask.shape):
            raise ArgumentError(f"tokens have shape {tuple(tokens.shape)} but {source} has {tuple(user_mask.shape)} "
                                "(batch, pos)")
        tokens = [row[m].tolist() for row, m in zip(tokens.cpu(), user_mask)]
    if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, (list, tuple)) for t in tokens):
        if len(tokens) == user_mask.shape[0] and all(len(t) == user_mask.shape[1] for t in tokens):
            tokens = [[int(i) for i, m in zip(t, row) if m] for t, row in zip(tokens, user_mask.tolist())]
    prompt_set, token_lists = _tokenize(model, tokens, prepend_bos)
    if len(token_lists) != user_mask.shape[0]:
        raise ArgumentError(f"{len(token_lists)} prompts but {source} has a batch of {user_mask.shape[0]}")
    return prompt_set, token_lists


def _real_positions(shape, attention_mask) -> Bool[Tensor, "batch pos"]:
    """The attention mask as booleans (every position real without one); each row's real positions must be contiguous."""
    if attention_mask is None:
        return torch.ones(*shape, dtype=torch.bool)
    mask = attention_mask.detach().cpu().bool()
    if tuple(mask.shape) != tuple(shape):
        raise ArgumentError(f"attention_mask has shape {tuple(mask.shape)}, the activations {tuple(shape)} (batch, pos)")
    starts, lengths = mask.int().argmax(1), mask.sum(1)
    for i, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if n == 0 or not bool(mask[i, start: start + n].all()):
            raise ArgumentError(f"attention_mask row {i} is {'empty' if n == 0 else 'not one contiguous run'}: "
                                "lensdyn reads left- or right-padded batches")
    return mask


def _batch_first(x: Tensor) -> Tensor:
    """A cached activation with its batch dimension (a cache made with ``remove_batch_dim`` has none)."""
    return x if x.dim() >= 3 else x[None]


def _check_stream_names(streams: Sequence[str]) -> None:
    unknown = set(streams) - set(STREAMS)
    if unknown:
        raise ArgumentError(f"unknown stream(s) {sorted(unknown)}: choose from {', '.join(STREAMS)}")


# Capture's constructors from activations at hand live here, beside their checks; lensdyn.hooks imports this
# module, so they are there wherever Capture is.
Capture.from_activation_cache = staticmethod(from_activation_cache)
Capture.from_hidden_states = staticmethod(from_hidden_states)
