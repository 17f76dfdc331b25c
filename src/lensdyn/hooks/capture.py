"""One forward pass per batch, caching only the hook points an analysis needs.

``capture(model, prompts)`` returns a ``Capture``: the residual stream and the sublayer
contributions of every block, stacked by state (``resid``) or by block (the sublayer streams),
with the masks that say which positions are real tokens and which enter aggregates.

State convention (``lensdyn.conventions``, convention 1): ``resid[l]`` for ``l < n_layers`` is the input of
block ``l`` (``blocks.l.hook_resid_pre``); ``resid[n_layers]`` is the output of the last block
*before* the final norm. The post-final-norm state is never one of the states.

Pre-norm models (Llama, GPT-2, Gemma, ...): ``resid_pre + attn_out == resid_mid`` and
``resid_mid + mlp_out == resid_post`` exactly.

Post-norm models (BERT): each block computes ``mid = LN1(pre + attn_out)`` and
``post = LN2(mid + mlp_out)``. ``resid`` holds the states between blocks (Hugging Face's
``hidden_states``; there is no final norm), ``resid_mid`` the state after ``LN1``,
``attn_out``/``mlp_out`` the sublayer outputs that are added *before* each norm. On BERT the
bridge's own ``hook_attn_out`` holds ``LN1``'s output and its ``hook_resid_mid`` is not the
post-attention state, so lensdyn reads ``ln1.hook_in``/``ln1.hook_out`` instead (tested against
the Hugging Face modules).

Storage is packed: each stream holds only the real tokens, prompt after prompt
(``Capture.packed[stream]``, ``[state or block, token, ...]``), so a set of prompts of very different
lengths costs its tokens, not prompts x longest prompt (the built-in diverse set: 1,331 tokens
instead of 9 x 455 padded positions). Analyses read it through ``tokens_of`` (the tokens in a
mask, pooled) and ``prompt_of`` (one prompt's states, a view). ``cap.resid`` and the other stream
names still give the padded ``[state or block, batch, pos, ...]`` tensors (zeros at padding), built on
first use and kept, for notebooks and per-position work.

``attn_in``/``mlp_in`` are what each sublayer reads: on pre-norm models the norm's output with
its learned gain (``ln{1,2}.hook_out``), on post-norm models the residual itself (``resid_pre``,
and ``LN1``'s output for the MLP). ``ln{1,2}_normalized`` is the norm's output before its learned
gain (``ln.hook_normalized``); ``ln{1,2}_scale`` the divisor the norm applied.

The exclusion rules ``"first"``, ``"bos"`` and ``"special"`` read the token ids; ``"massive"``
(``lensdyn.conventions``, convention 9) reads the activations: a position leaves ``mask`` when its
residual state carries a massive activation (``lensdyn.ops.massive_mask``) at any state, found by
the residual hooks during the pass (whether or not ``resid`` is stored) and recorded in
``Capture.massive_positions``. The untrained control leaves out the model's massive positions,
not its own (``control_capture``), so the two are measured token for token.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lensdyn.errors import (
    ArgumentError,
    HookSemanticsError,
    NonFiniteActivationError,
    PromptError,
    PromptTooLongError,
    UnsupportedArchitectureError,
)
from lensdyn.layouts import BlockLayout
from lensdyn.models import ModelInfo, block_layout, model_info
from lensdyn.ops import massive_mask
from lensdyn.progress import track
from lensdyn.hooks.fused_attention import fused_attention, use_fused_attention
from lensdyn.hooks.selftest import ensure_self_tested
from lensdyn.prompts import PromptSet, resolve_prompts

STREAMS = (
    "resid",
    "resid_mid",
    "attn_in",
    "attn_out",
    "mlp_in",
    "mlp_out",
    "ln1_normalized",
    "ln2_normalized",
    "ln1_scale",
    "ln2_scale",
)
EXCLUDE_RULES = ("first", "bos", "special", "massive")


@dataclass(frozen=True, repr=False)
class Capture:
    """Activations of one set of prompts (module docstring: packed storage, padded views).

    Built by ``capture()``, or from activations already at hand: ``Capture.from_activation_cache``
    (a TransformerLens ``ActivationCache``) and ``Capture.from_hidden_states`` (Hugging Face
    ``output_hidden_states``), both in ``lensdyn.hooks.external``.

    Shapes: ``state = n_layers + 1`` residual states, ``block = n_layers`` sublayer outputs, ``token`` the
    real tokens of every prompt, prompt after prompt (``token_mask.sum()`` of them). Streams not
    asked for are absent from ``packed``; ``require(name)`` returns one or says how to capture it.
    """

    tokens: Int[Tensor, "batch pos"]
    token_mask: Bool[Tensor, "batch pos"]  # real tokens (False at padding)
    mask: Bool[Tensor, "batch pos"]  # positions that enter aggregates: real and not excluded
    str_tokens: tuple[tuple[str, ...], ...]
    prompts: PromptSet
    model_info: ModelInfo
    exclude: tuple[str, ...]
    truncated: tuple[int, ...]  # indices of prompts cut to the context length (truncate=True)
    n_layers: int
    packed: dict[str, Tensor] = field(default_factory=dict)  # stream -> [state or block, token, (d_model)]
    attention: Float[Tensor, "block batch head query key"] | None = None
    absent: tuple[str, ...] = ()  # streams asked for that this block layout does not have (lensdyn.layouts)
    # The "massive" rule's (prompt, position) pairs, out of ``mask``, and the model whose residual stream
    # they were found in ("name (weights)"; the trained model's for its control). Empty without the rule.
    massive_positions: tuple[tuple[int, int], ...] = ()
    massive_source: str = ""
    # Stream -> why this capture lacks it, for one built from activations the user had (lensdyn.hooks.external).
    missing: dict[str, str] = field(default_factory=dict, compare=False)
    _padded: dict[str, Tensor] = field(default_factory=dict, init=False, compare=False)  # padded views, built on use

    def __post_init__(self):
        n_real = int(self.token_mask.sum())
        for stream, value in self.packed.items():
            if stream not in STREAMS:
                raise ArgumentError(f"unknown stream {stream!r}: choose from {', '.join(STREAMS)}")
            n_states = self.n_layers + 1 if stream == "resid" else self.n_layers
            if value.shape[:2] != (n_states, n_real):
                raise ArgumentError(f"packed {stream!r} has shape {tuple(value.shape)}: expected ({n_states}, {n_real}, ...) "
                                    f"for {self.n_layers} blocks and {n_real} real tokens")

    @classmethod
    def from_padded(cls, *, token_mask: Bool[Tensor, "batch pos"], **fields) -> Capture:
        """A Capture from padded ``[state or block, batch, pos, ...]`` streams (``resid=...``), for hand-built known inputs."""
        streams = {name: fields.pop(name) for name in STREAMS if fields.get(name) is not None}
        for name in STREAMS:
            fields.pop(name, None)
        for name, value in streams.items():
            if value.shape[1:3] != token_mask.shape:
                raise ArgumentError(f"{name} has shape {tuple(value.shape)}: its batch and pos must be {tuple(token_mask.shape)}")
        return cls(token_mask=token_mask, packed={name: v[:, token_mask] for name, v in streams.items()}, **fields)

    def require(self, stream: str) -> Tensor:
        """The named stream, padded ``[state or block, batch, pos, ...]``, or a clear error saying how to capture it."""
        if stream == "attention":
            if self.attention is None:
                raise ArgumentError("this capture holds no 'attention': capture again with attention=True")
            return self.attention
        self.require_streams((stream,))
        if stream not in self._padded:
            value = self.packed[stream]
            padded = value.new_zeros(value.shape[0], *self.token_mask.shape, *value.shape[2:])
            padded[:, self.token_mask] = value
            self._padded[stream] = padded
        return self._padded[stream]

    def tokens_of(self, stream: str, mask: Bool[Tensor, "batch pos"] | None = None, prompt: int | None = None) -> Tensor:
        """``[state or block, n, ...]``: the stream at the positions where ``mask`` (default ``self.mask``) holds, in
        (prompt, position) order; only prompt ``prompt`` when given. The same as
        ``masked_tokens(cap.require(stream), mask)`` without the padded copy; do not write into it.
        """
        self.require_streams((stream,))
        mask = self.mask if mask is None else mask
        if prompt is not None:
            n = self.lengths[prompt]
            return self.prompt_of(stream, prompt)[:, mask[prompt, :n]]
        keep = mask[self.token_mask]
        if len(keep) and bool(keep.all()):
            return self.packed[stream]
        return self.packed[stream][:, keep]

    def prompt_of(self, stream: str, prompt: int) -> Tensor:
        """``[state or block, length, ...]``: every real position of one prompt (a view into the packed stream)."""
        self.require_streams((stream,))
        start = self.offsets[prompt]
        return self.packed[stream][:, start: start + self.lengths[prompt]]

    def pad(self, values: Tensor) -> Tensor:
        """Per-token values ``[state or block, token, ...]`` (packed order) laid out as
        ``[state or block, batch, pos, ...]``, zeros at padding."""
        padded = values.new_zeros(values.shape[0], *self.token_mask.shape, *values.shape[2:])
        padded[:, self.token_mask] = values
        return padded

    @property
    def lengths(self) -> list[int]:
        """Real tokens of each prompt."""
        return self.token_mask.sum(1).tolist()

    @property
    def offsets(self) -> list[int]:
        """Where each prompt starts in the packed streams."""
        return [0, *itertools.accumulate(self.lengths)][:-1]

    def same_prompts(self):
        """What to pass to ``capture`` to run these prompts again: the texts, or the token ids when it was given ids."""
        if self.prompts.name != "token-ids":
            return self.prompts
        return [self.tokens[i, : int(n)].tolist() for i, n in enumerate(self.token_mask.sum(1))]

    def require_streams(self, streams: Sequence[str], allow_absent: bool = False) -> None:
        """Fail with every missing stream named at once (an analysis checks its ``STREAMS`` up front).

        ``allow_absent``: streams this block layout does not have pass (the analysis reads around them).
        """
        absent = [s for s in streams if s in self.absent and s not in self.packed]
        if absent and not allow_absent:
            raise UnsupportedArchitectureError(
                f"{', '.join(map(repr, absent))} does not exist on {self.model_info.layout} blocks ({self.model_info.name}): "
                "see lensdyn.layouts for what each stream means per layout"
            )
        missing = [s for s in streams if s not in self.packed and s not in self.absent]
        known = [f"{s!r}: {self.missing[s]}" for s in missing if s in self.missing]
        if known:
            raise ArgumentError(f"this capture holds no {', '.join(map(repr, missing))} ({'; '.join(known)})")
        if missing:
            raise ArgumentError(
                f"this capture holds no {', '.join(map(repr, missing))}: capture again with streams={tuple(streams)!r}"
            )

    def mlp_writes_into(self, mask: Bool[Tensor, "batch pos"] | None = None) -> Tensor:
        """``[block, n, d_model]``: the residual state each MLP's write is added to: ``resid_mid`` on
        sequential blocks, the block input ``resid_pre`` on parallel ones (``lensdyn.layouts``)."""
        if self.model_info.layout == "parallel":
            return self.tokens_of("resid", mask)[:-1]
        return self.tokens_of("resid_mid", mask)

    def __repr__(self) -> str:
        # The default dataclass repr would print every tensor; a notebook wants the shapes.
        held = ", ".join(f"{name}={tuple(value.shape)}" for name, value in self.packed.items())
        if self.attention is not None:
            held += f", attention={tuple(self.attention.shape)}"
        return (
            f"Capture(model={self.model_info.name!r} ({self.model_info.weights}), prompts={self.prompts.name!r} "
            f"x{self.n_prompts}, tokens={self.n_tokens} of {int(self.token_mask.sum())}, "
            f"exclude={self.exclude}{f', massive={len(self.massive_positions)}' if 'massive' in self.exclude else ''}, "
            f"packed {held})"
        )

    @property
    def n_prompts(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        """Tokens that enter aggregates (``mask.sum()``)."""
        return int(self.mask.sum())


# Every stream is also readable by its name, padded: cap.resid is cap.require("resid").
for _stream in STREAMS:
    _axis = "state" if _stream == "resid" else "block"
    setattr(Capture, _stream, property(lambda self, _s=_stream: self.require(_s) if _s in self.packed else None,
                                       doc=f"``{_stream}`` padded to ``[{_axis}, batch, pos, ...]`` (None if not captured)."))
del _stream, _axis


def capture(
    model,
    prompts,
    *,
    exclude: Sequence[str] = ("first",),
    batch_size: int = 8,
    attention: bool = False,
    streams: Sequence[str] = STREAMS,
    truncate: bool = False,
    prepend_bos: bool | None = None,
    progress: bool = False,
    store_device: str | torch.device = "auto",
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    massive_from: Capture | Future | None = None,
) -> Capture:
    """Run ``prompts`` through ``model`` once, batch by batch, and return the activations.

    Args:
        model: a TransformerBridge (from ``ld.load_model`` or your own).
        prompts: a PromptSet, a built-in set name, a path, a string, a list of strings, or
            pre-tokenised ids (a list of int lists or an int tensor ``[batch, pos]``).
        exclude: positions left out of ``mask``: ``"first"`` (position 0, where BOS and
            attention sinks carry norms up to 10^5 times the rest), ``"bos"`` (wherever the BOS
            id appears), ``"special"`` (all tokenizer special tokens, e.g. BERT's [CLS]/[SEP]),
            ``"massive"`` (every position whose residual state holds a massive activation at some
            state: module docstring). Use ``()`` to keep every position.
        batch_size: at most this many prompts per forward pass. Prompts are batched by length
            (right padding, with the attention mask) and written back in their original order; a
            batch only takes prompts at least ``MIN_FILL`` (80%) as long as its longest, because
            padding costs a full forward pass per padded position (on CPU, batching the diverse
            set 8 at a time without this rule took 3x longer than one prompt at a time).
        attention: also cache attention patterns ``[block, batch, head, query, key]``.
        streams: which of ``STREAMS`` to cache; fewer streams, less memory.
        truncate: cut prompts longer than the model's context to its first ``n_ctx`` tokens
            (recorded in ``Capture.truncated``); by default such a prompt is an error.
        prepend_bos: for text prompts, put the BOS token first (True), never (False), or as the checkpoint's own
            tokenizer does (None, the default; SmolLM2: no BOS). TransformerLens turns BOS on
            for every tokenizer it wraps; lensdyn does not follow it silently.
        progress: show a progress bar over batches.
        store_device: where the packed streams (and attention) live. ``"auto"`` (the default): the
            model's device (``resolve_store_device``), so that on a GPU the analyses reduce the
            activations where they were computed and only reduced arrays cross to the host; on a
            CPU model nothing changes. A capture holds ``states x tokens x d_model`` values per
            stream, next to the model in GPU memory (SmolLM2-135M, every stream, the diverse set's
            1,331 tokens: (31 + 7 x 30) x 1,331 x 576 float32 values, 0.74 GB): pass ``"cpu"``
            when that would not fit (many prompts, every stream, a big model). The corpus workflow
            reduces each chunk on the device, so it holds one chunk whatever the corpus size.
        fwd_hooks: extra ``(hook name, fn)`` pairs active during the pass, for interventions
            (e.g. ``lensdyn.hooks.temperature.temperature_hooks``); they run before the capture's own.
        massive_from: with ``exclude`` naming ``"massive"``, leave out that capture's massive
            positions instead of finding this model's own (it must hold the same tokens):
            ``control_capture`` passes the trained model's capture. A ``concurrent.futures.Future``
            of one is waited for after this capture's forward passes, which need nothing of it (a
            report's controls run theirs while the model's capture is still running).

    Example:
        >>> model = ld.load_model("smollm2-135m")                          # doctest: +SKIP
        >>> cap = ld.capture(model, "diverse", streams=("resid",))       # doctest: +SKIP
        >>> cap.packed["resid"].shape   # doctest: +SKIP
        (31, 1331, 576)     # 30 block inputs + the last block output before the final norm, for every real token
        >>> cap.resid.shape             # doctest: +SKIP
        (31, 9, 455, 576)   # the same, padded (built on first use)
    """
    unknown = set(streams) - set(STREAMS)
    if unknown:
        raise ArgumentError(f"unknown stream(s) {sorted(unknown)}: choose from {', '.join(STREAMS)}")
    bad_rules = set(exclude) - set(EXCLUDE_RULES)
    if bad_rules:
        raise ArgumentError(f"unknown exclude rule(s) {sorted(bad_rules)}: choose from {', '.join(EXCLUDE_RULES)}")
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be at least 1, not {batch_size}")
    if model.training:
        raise ArgumentError("the model is in training mode (dropout would perturb every activation): call model.eval()")

    info = model_info(model)
    if prepend_bos is None:
        prepend_bos = info.prepend_bos
    prompt_set, token_lists = _tokenize(model, prompts, prepend_bos)
    token_lists, truncated = _fit_context(token_lists, prompt_set, model.cfg.n_ctx, truncate)

    n_prompts, max_len = len(token_lists), max(len(t) for t in token_lists)
    tokens = torch.zeros(n_prompts, max_len, dtype=torch.long)
    token_mask = torch.zeros(n_prompts, max_len, dtype=torch.bool)
    for i, ids in enumerate(token_lists):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        token_mask[i, : len(ids)] = True
    if massive_from is not None:  # a Future's capture is checked once it is there, after the forward passes
        _check_massive_from(massive_from if isinstance(massive_from, Capture) else None, exclude, tokens)

    mask = token_mask & ~_excluded(model, tokens, token_mask, exclude)
    if not bool(mask.any()):
        # Every aggregate would be over nothing: say so now, not as NaNs or empty tables later.
        raise PromptError(
            f"no token left to measure: exclude={tuple(exclude)} removes every token of "
            f"{'the prompt' if n_prompts == 1 else f'all {n_prompts} prompts'} (longest {max_len}); "
            "give a longer prompt or exclude=()")
    layout = block_layout(model)
    # A stream the layout lacks (resid_mid on a parallel block) is not captured, and says so when read.
    absent = tuple(s for s in streams if s not in layout.stream_hooks(0) and s != "resid")
    find_massive = "massive" in exclude and massive_from is None
    buffers = _Buffers(model, layout, [s for s in streams if s not in absent], attention, token_mask,
                       resolve_store_device(model, store_device), extra_hooks=list(fwd_hooks), find_massive=find_massive)
    ensure_self_tested(model, token_lists[0])  # once per model: hooks hold what their names say
    device = next(model.parameters()).device
    batches = _length_batches([len(t) for t in token_lists], batch_size)
    with torch.inference_mode():
        for rows in track(batches, "capture", unit="batch", enabled=progress):
            length = max(len(token_lists[i]) for i in rows)
            row_index = torch.tensor(rows, dtype=torch.long)
            batch_tokens = tokens[row_index, :length].to(device)
            batch_mask = token_mask[row_index, :length]
            buffers.run(batch_tokens, batch_mask, row_index)

    massive_positions, massive_source = (), ""
    if find_massive:
        massive_positions = tuple(map(tuple, token_mask.nonzero()[buffers.massive.cpu()].tolist()))
        massive_source = f"{info.name} ({info.weights})"
    elif massive_from is not None:
        if not isinstance(massive_from, Capture):
            massive_from = _check_massive_from(massive_from.result(), exclude, tokens)
        massive_positions, massive_source = massive_from.massive_positions, massive_from.massive_source
    for prompt, position in massive_positions:
        mask[prompt, position] = False
    if massive_positions and not bool(mask.any()):
        raise PromptError(f"no token left to measure: exclude={tuple(exclude)} leaves out every token, "
                          f"{len(massive_positions)} of them for massive activations; drop 'massive' from exclude")

    str_tokens = _str_tokens(model, token_lists)
    return Capture(
        tokens=tokens,
        token_mask=token_mask,
        mask=mask,
        str_tokens=str_tokens,
        prompts=prompt_set,
        model_info=info,
        exclude=tuple(exclude),
        truncated=tuple(truncated),
        n_layers=model.cfg.n_layers,
        packed=buffers.packed,
        attention=buffers.attention,
        absent=absent,
        massive_positions=massive_positions,
        massive_source=massive_source,
    )


def _check_massive_from(source: Capture | None, exclude: Sequence[str], tokens: Tensor | None = None) -> Capture | None:
    """``capture``'s ``massive_from``, once it leaves out massive positions found on the same ``tokens`` (None: only
    ``exclude`` is checked)."""
    if "massive" not in exclude or (source is not None and "massive" not in source.exclude):
        raise ArgumentError("massive_from= leaves out another capture's massive positions: exclude must name 'massive', "
                            "and so must that capture's (else it found none)")
    if source is not None and tokens is not None and not torch.equal(source.tokens, tokens):
        raise ArgumentError(f"massive_from= holds other tokens ({source.prompts.name!r}, shape "
                            f"{tuple(source.tokens.shape)}): its massive positions would not be these prompts'")
    return source


def resolve_store_device(model, store_device: str | torch.device = "auto") -> torch.device:
    """Where ``capture`` keeps the streams: ``store_device`` itself, or for ``"auto"`` the device of the
    model's first parameter (where its embedding runs), the CPU when that is ``meta`` (weights offloaded
    to disk by a ``device_map``, loaded per block).

    >>> resolve_store_device(torch.nn.Linear(2, 2)), resolve_store_device(torch.nn.Linear(2, 2), "cpu")
    (device(type='cpu'), device(type='cpu'))
    """
    if isinstance(store_device, str) and store_device == "auto":
        device = next(model.parameters()).device
        return torch.device("cpu") if device.type == "meta" else device
    try:
        return torch.device(store_device)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"store_device {store_device!r} is not a torch device: give 'auto', 'cpu' or e.g. 'cuda:0'") from None


def included_counts(
    model, prompts, exclude: Sequence[str] = ("first",), truncate: bool = False, prepend_bos: bool | None = None
) -> list[int]:
    """How many tokens of each prompt ``capture`` would keep in ``mask``, without a forward pass.

    The capture's own tokenisation (``prepend_bos`` as in ``capture``), truncation and ``exclude``
    rules, one prompt at a time (a padded tensor of a whole corpus would be its full size). A prompt
    longer than the context raises ``PromptTooLongError`` here already unless ``truncate``.
    The ``"massive"`` rule reads activations, so it removes nothing here: with it, these counts are
    upper bounds (the capture then says if nothing is left).

    >>> included_counts(model, ["One short prompt.", "Two."])          # doctest: +SKIP
    [3, 1]
    """
    if prepend_bos is None:
        prepend_bos = model_info(model).prepend_bos
    prompt_set, token_lists = _tokenize(model, prompts, prepend_bos)
    token_lists, _ = _fit_context(token_lists, prompt_set, model.cfg.n_ctx, truncate)
    counts = []
    for ids in token_lists:
        tokens = torch.tensor([ids], dtype=torch.long)
        counts.append(len(ids) - int(_excluded(model, tokens, torch.ones_like(tokens, dtype=torch.bool), exclude).sum()))
    return counts


def capture_for(capture_or_model, prompts, streams: Sequence[str], **capture_kwargs) -> tuple[Capture, object | None]:
    """What every ``measure()`` starts with: ``(capture, model)`` from a ``Capture`` (model None) or
    from a model and prompts (captured here with ``streams``)."""
    if isinstance(capture_or_model, Capture):
        return capture_or_model, None
    return capture(capture_or_model, prompts, streams=streams, **capture_kwargs), capture_or_model


def control_capture(model, like: Capture, streams: Sequence[str]) -> tuple[Capture, object]:
    """The untrained twin of ``model`` run on the prompts of ``like``, with its exclusion and
    truncation: ``(capture, random_model)``. Under ``"massive"`` it leaves out ``like``'s massive
    positions, not its own: the control is measured on the model's tokens, one for one."""
    from lensdyn.models import random_control

    random_model = random_control(model)
    cap = capture(random_model, like.same_prompts(), streams=streams, exclude=like.exclude, truncate=bool(like.truncated),
                  massive_from=like if "massive" in like.exclude else None)
    return cap, random_model


MIN_FILL = 0.8


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped longest first: at most ``batch_size`` per group, each at least
    ``MIN_FILL`` times the group's longest.

    >>> _length_batches([10, 100, 95, 50, 9], 8)
    [[1, 2], [3], [0, 4]]
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and len(batches[-1]) < batch_size and lengths[i] >= MIN_FILL * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class _CaptureComplete(Exception):
    """Raised by the last hook needed, so the pass skips the final norm and the unembedding."""


@dataclass
class _Buffers:
    """Preallocated outputs (packed streams, padded attention) and the hook functions that fill them."""

    model: object
    layout: BlockLayout
    streams: Sequence[str]
    want_attention: bool
    token_mask: Tensor
    store_device: str | torch.device
    extra_hooks: list = field(default_factory=list)
    find_massive: bool = False  # flag each real token whose residual state holds a massive activation
    packed: dict[str, Tensor] = field(default_factory=dict)
    attention: Tensor | None = None
    plan: list[tuple[str, str | None, int]] = field(default_factory=list)
    starts: Tensor | None = None  # where each prompt's first token goes in the packed streams
    massive: Tensor | None = None  # [token] (packed order), with find_massive

    def __post_init__(self):
        cfg = self.model.cfg
        wanted = set(self.streams) | ({"attention"} if self.want_attention else set()) | (
            {"massive"} if self.find_massive else set())
        # Checked before anything is allocated or run: a bridge without these hooks fails at once.
        self.plan = _check_hooks_exist(self.model, _hook_plan(cfg.n_layers, self.layout, wanted))
        dtype = next(self.model.parameters()).dtype
        n, n_real = cfg.n_layers, int(self.token_mask.sum())
        # Every real token of every stream is written by some batch, so nothing needs zeroing.
        for stream in self.streams:
            n_states = n + 1 if stream == "resid" else n
            trailing = () if stream.endswith("_scale") else (cfg.d_model,)
            self.packed[stream] = torch.empty(n_states, n_real, *trailing, dtype=dtype, device=self.store_device)
        if self.want_attention:
            n_prompts, max_len = self.token_mask.shape
            self.attention = torch.zeros(n, n_prompts, cfg.n_heads, max_len, max_len, dtype=dtype, device=self.store_device)
        self.starts = torch.cumsum(self.token_mask.sum(1), 0) - self.token_mask.sum(1)
        if self.find_massive:
            self.massive = torch.zeros(n_real, dtype=torch.bool, device=self.store_device)

    def run(self, batch_tokens: Tensor, batch_mask: Tensor, rows: Tensor) -> None:
        # Each hook only records whether what it stored is finite (a device flag): reading every flag at
        # once costs one host sync per batch, not one per hook. A batch with a non-finite flag runs again,
        # checked hook by hook, to name the hook and prompts (or to find that only padding was).
        finite: list[Tensor] = []
        self._pass(batch_tokens, batch_mask, rows, finite)
        if finite and not bool(torch.stack([f.to(self.store_device) for f in finite]).all()):
            self._pass(batch_tokens, batch_mask, rows, None)
        if self.attention is not None:
            # Padding positions hold whatever the batch computed there.
            pad = ~self.token_mask[rows].to(self.store_device)
            outside = pad[None, :, None, :, None] | pad[None, :, None, None, :]
            self.attention[:, rows] = self.attention[:, rows].masked_fill(outside, 0)

    def _pass(self, batch_tokens: Tensor, batch_mask: Tensor, rows: Tensor, finite: list[Tensor] | None) -> None:
        """One forward pass filling the buffers; ``finite`` collects a flag per stored value (None: check each now)."""
        fired: set[str] = set()
        fwd_hooks = self._hooks(batch_mask, rows, fired, finite)
        last_hook = fwd_hooks[-1][0]
        # A caller's own hooks may read inside the attention: only a capture of lensdyn's streams alone is fused.
        fused = use_fused_attention(self.model, batch_tokens.shape[1], self.want_attention or bool(self.extra_hooks))
        try:
            with fused_attention(self.model) if fused else contextlib.nullcontext():
                self.model.run_with_hooks(
                    batch_tokens,
                    attention_mask=batch_mask.to(batch_tokens.device).long(),
                    fwd_hooks=[*self.extra_hooks, *fwd_hooks],
                )
        except _CaptureComplete:
            pass
        else:
            raise HookSemanticsError(f"capture: hook {last_hook} never fired; the bridge did not run every block")
        unfired = [name for name, _, _ in self.plan if name not in fired]
        if unfired:  # its buffer would hold whatever memory it was given
            raise HookSemanticsError(f"capture: hook point(s) {unfired[:3]} never fired on this batch "
                                     "(attention patterns need attn_implementation='eager')")

    def _hooks(self, batch_mask: Tensor, rows: Tensor, fired: set[str], finite: list[Tensor] | None
               ) -> list[tuple[str, Callable]]:
        post_norm, length, last_hook = self.layout.name == "post-norm", batch_mask.shape[1], self.plan[-1][0]
        resid_pre: dict[int, Tensor] = {}
        # The batch's real tokens, in (row, position) order, and where they go in the packed streams: index
        # tensors built once per batch on the devices that use them (a boolean mask would sync per hook).
        lengths = batch_mask.sum(1)
        destination = torch.cat([torch.arange(int(n)) + self.starts[r] for r, n in zip(rows.tolist(), lengths)])
        destination = destination.to(self.store_device)
        unpadded = bool(batch_mask.all())  # then the real tokens are the batch itself, a view: no gather
        real_index = batch_mask.flatten().nonzero().squeeze(1)
        on_device: dict[torch.device, Tensor] = {}  # real_index per device: a device_map spreads the blocks

        def real_tokens(x: Tensor) -> Tensor:
            """``x[batch_mask]``: ``[batch, pos, ...]`` -> ``[real token, ...]``."""
            if unpadded:
                return x.flatten(0, 1)
            if x.device not in on_device:
                on_device[x.device] = real_index.to(x.device)
            return x.flatten(0, 1).index_select(0, on_device[x.device])

        def flag_finite(value: Tensor) -> None:
            if finite is not None:
                finite.append(torch.isfinite(value.sum(dtype=torch.promote_types(value.dtype, torch.float32))))

        def write(stream: str, index: int, value: Tensor) -> None:
            if stream == "attention":
                target = self.attention[index, :, :, :length, :length]
                target.index_copy_(0, rows.to(target.device), value.to(self.store_device, target.dtype))
                flag_finite(value)  # padding included: a flag raised there only costs the checked pass
                return
            if value.dim() == 2:  # OPT's blocks flatten [batch, pos] before the MLP's norm
                value = value.reshape(*batch_mask.shape, -1)
            if stream.endswith("_scale"):
                value = value.squeeze(-1)
            target = self.packed[stream][index]
            real = real_tokens(value).to(self.store_device, target.dtype)
            target.index_copy_(0, destination, real)
            flag_finite(real)

        def flag_massive(x: Tensor) -> None:
            self.massive[destination] |= massive_mask(real_tokens(x)).any(dim=-1).to(self.store_device)

        def make(name: str, stream: str | None, index: int) -> Callable:
            is_state = name.endswith("hook_resid_pre") or name == last_hook

            def hook_fn(x: Tensor, hook) -> Tensor:
                fired.add(name)
                if self.find_massive and is_state:
                    flag_massive(x)
                if name.endswith("hook_resid_pre"):
                    resid_pre[index] = x
                if stream is not None:
                    # Post-norm attn_out is what LN1 reads minus the residual it was added to.
                    value = x - resid_pre.pop(index) if post_norm and stream == "attn_out" else x
                    if finite is None:
                        _check_finite(value, name, batch_mask, rows)
                    write(stream, index, value)
                if name == last_hook:
                    raise _CaptureComplete
                return x

            return hook_fn

        return [(name, make(name, stream, index)) for name, stream, index in self.plan]


def _hook_plan(n_layers: int, layout: BlockLayout, wanted: set[str]) -> list[tuple[str, str | None, int]]:
    """(hook point, stream it fills or None, block index), in the order the forward pass reaches them.

    Where each stream is read from is the layout's (``BlockLayout.stream_hooks``); one hook point
    may fill two streams. The last entry is always the last block's ``hook_resid_post``: the pass stops there.
    ``"massive"`` in ``wanted`` asks for every state's hook point, stored or not (the rule reads each state).
    """
    post_norm = layout.name == "post-norm"
    plan: list[tuple[str, str | None, int]] = []
    for layer in range(n_layers):
        if "resid" in wanted or "massive" in wanted or (post_norm and "attn_out" in wanted):
            plan.append((f"blocks.{layer}.hook_resid_pre", "resid" if "resid" in wanted else None, layer))
        plan += [(hook, stream, layer) for stream, hook in layout.stream_hooks(layer).items() if stream in wanted]
    plan.append((f"blocks.{n_layers - 1}.hook_resid_post", "resid" if "resid" in wanted else None, n_layers))
    return plan


def _check_hooks_exist(model, plan: list[tuple[str, str | None, int]]) -> list[tuple[str, str | None, int]]:
    hook_names = set(model.hook_dict)  # built anew on every access: read it once
    missing = [name for name, _, _ in plan if name not in hook_names]
    if missing:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no hook point(s) {missing[:3]}: lensdyn needs "
            "TransformerLens 4 bridge hook names (blocks.{l}.hook_resid_pre, ...)"
        )
    return plan


def _check_finite(x: Tensor, hook_name: str, batch_mask: Tensor, rows: Tensor) -> None:
    # A finite sum proves every entry finite (a NaN or inf anywhere makes the sum NaN or inf), in one cheap pass
    # (10x faster than isfinite); a sum that overflows only sends us to the exact check below.
    if bool(torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)))):
        return
    # Only real tokens count: padding positions may legitimately hold anything.
    bad = ~torch.isfinite(x)
    if hook_name.endswith("hook_pattern"):  # [batch, head, query, key] -> [batch, query]
        bad = bad.any(dim=-1).any(dim=1)
    else:  # [batch, pos, ...] -> [batch, pos]
        bad = bad.reshape(*bad.shape[:2], -1).any(dim=-1)
    bad = bad.cpu() & batch_mask
    if bool(bad.any()):
        prompts = sorted(int(rows[i]) for i in torch.nonzero(bad.any(dim=1)).flatten())
        raise NonFiniteActivationError(hook_name, int(bad.sum()), prompts)


def _tokenize(model, prompts, prepend_bos: bool | None) -> tuple[PromptSet, list[list[int]]]:
    if isinstance(prompts, Tensor) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, (list, tuple)) for p in prompts)
    ):
        token_lists = [list(map(int, p)) for p in prompts]
        if not token_lists:
            raise PromptError("empty prompt set: give at least one prompt")
        if any(len(t) == 0 for t in token_lists):
            raise PromptError("a pre-tokenised prompt is empty")
        prompt_set = PromptSet(
            name="token-ids",
            texts=tuple(f"<{len(t)} token ids>" for t in token_lists),
            labels=tuple(f"ids[{i}]" for i in range(len(token_lists))),
        )
        return prompt_set, token_lists
    prompt_set = resolve_prompts(prompts)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise PromptError("this model has no tokenizer: pass token ids (a list of int lists or an int tensor)")
    bos = tokenizer.bos_token_id
    token_lists = [_with_bos(list(tokenizer(text)["input_ids"]), bos, prepend_bos) for text in prompt_set.texts]
    for label, ids in zip(prompt_set.labels, token_lists):
        if not ids:
            raise PromptError(f"prompt {label!r} tokenises to nothing")
    return prompt_set, token_lists


def _with_bos(ids: list[int], bos: int | None, prepend_bos: bool | None) -> list[int]:
    if bos is None or prepend_bos is None:
        return ids
    has_bos = bool(ids) and ids[0] == bos
    if prepend_bos and not has_bos:
        return [bos, *ids]
    if not prepend_bos and has_bos:
        return ids[1:]
    return ids


def _fit_context(token_lists, prompt_set: PromptSet, n_ctx: int, truncate: bool):
    truncated = [i for i, ids in enumerate(token_lists) if len(ids) > n_ctx]
    if truncated and not truncate:
        i = truncated[0]
        raise PromptTooLongError(
            f"prompt {prompt_set.labels[i]!r} has {len(token_lists[i])} tokens but the model's context "
            f"is {n_ctx}; pass truncate=True (CLI: --truncate) to keep its first {n_ctx} tokens"
        )
    return [ids[:n_ctx] for ids in token_lists], truncated


def _excluded(model, tokens: Tensor, token_mask: Tensor, exclude: Sequence[str]) -> Tensor:
    excluded = torch.zeros_like(token_mask)
    if "first" in exclude:
        excluded[:, 0] = True
    tokenizer = getattr(model, "tokenizer", None)
    if "bos" in exclude and tokenizer is not None and tokenizer.bos_token_id is not None:
        excluded |= tokens == tokenizer.bos_token_id
    if "special" in exclude and tokenizer is not None:
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        excluded |= torch.isin(tokens, special)
    return excluded & token_mask


def _str_tokens(model, token_lists: list[list[int]]) -> tuple[tuple[str, ...], ...]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return tuple(tuple(str(t) for t in ids) for ids in token_lists)
    return tuple(tuple(tokenizer.decode([t]) for t in ids) for ids in token_lists)
