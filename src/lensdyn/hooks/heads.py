"""Each attention head's write into the residual stream, reduced per token during the capture's pass.

Head ``h`` of block ``l`` writes ``d_h = z_h W_O^h`` (``z_h = hook_z[..., h, :]``, the head's
attention-weighted values, ``[token, d_head]``; ``W_O^h`` its ``[d_head, d_model]`` output map), and the
block's attention write is ``d = sum_h d_h + b_O`` (TransformerLens' ``stack_head_results``). The output
bias ``b_O`` is no head's: it is reported apart. Grouped-query attention needs nothing extra:
``hook_z`` and ``W_O`` are per query head (the K/V sharing is upstream of ``z``).

Per layout (``lensdyn.layouts``), ``d`` is the capture's ``attn_out``, the write added to the block
input ``h = resid_pre``:

- pre-norm, parallel, post-norm (BERT, ALBERT's one shared block): ``d = sum_h d_h + b_O`` as above
  (post-norm: the sum added before ``LN1``).
- post-sublayer-norm (Gemma 2/3, OLMo 2): ``attn_out = N1(o)`` with ``o = sum_h z_h W_O^h + b_O`` and
  ``N1(o) = g * o / s`` (``s``: ``ln1_post.hook_scale``, the norm's divisor of that token). With ``s``
  frozen (the usual attribution through a norm) ``N1`` is linear, so head ``h`` writes
  ``g * z_h W_O^h / s`` and the bias ``g * b_O / s``; they add to ``attn_out`` exactly. The gain ``g`` is
  read off the hooks, ``hook_out = g * hook_normalized``, by least squares over the batch's tokens
  (exact: it holds elementwise), so no family's parametrisation of the gain (Gemma's ``1 + w``) is assumed.

What is kept per block, head and token (``HeadWrites``, packed like ``Capture.packed``: every real token,
prompt after prompt), all float64: ``cross = 2 h.d_h``, ``overlap = d_h.d`` and ``norm = ||d_h||``;
per block and token the bias's ``2 h.b`` and ``b.d``. ``cross + overlap`` summed over the heads and the
bias is ``2 h.d + ||d||^2 = ||h + d||^2 - ||h||^2``, attention's growth term of expansion, exactly:
each head owns its own ``2 h.d_h`` and the share ``d_h.d`` of ``||d||^2 = sum_h d_h.d + b.d`` (the cross
terms ``d_h.d_k`` between two heads are split evenly, half to each).

Memory. Reduced (the default): ``(3 n_heads + 2) x 8`` bytes per block and token, so on smollm2-135m
(30 blocks, 9 heads) over the diverse set's 1,331 tokens 9.3 MB; the pass itself holds one block's
``[batch, pos, head, d_model]`` writes at a time (the activations' dtype: 9.4 MB for a 455-token
prompt). ``keep=(blocks...)`` also keeps those blocks' full writes ``[token, head, d_model]`` (and the
bias's ``[token, d_model]``) in the activations' dtype: ``n_heads x d_model x 4`` bytes per token and
block, 27.6 MB per block there (all 30 blocks: 828 MB, the ``[block, head, token, d_model]`` tensor
this module exists to avoid).

>>> cap, heads = head_capture(ld.load_model("smollm2-135m"), "diverse")   # doctest: +SKIP
>>> heads.cross.shape                                                    # doctest: +SKIP
torch.Size([30, 1331, 9])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lensdyn.errors import ArgumentError, HookSemanticsError, UnsupportedArchitectureError
from lensdyn.hooks.capture import Capture, _length_batches, capture
from lensdyn.models import block_layout

HEAD_STREAMS = ("resid", "attn_in", "attn_out")


@dataclass(frozen=True, repr=False)
class HeadWrites:
    """Per-head reductions of one capture (module docstring); ``token`` is the capture's packed order."""

    cross: Float[Tensor, "block token head"]  # 2 h.d_h
    overlap: Float[Tensor, "block token head"]  # d_h.d: the head's part of ||d||^2
    norm: Float[Tensor, "block token head"]  # ||d_h||
    bias_cross: Float[Tensor, "block token"]  # 2 h.b (zeros where attention has no output bias)
    bias_overlap: Float[Tensor, "block token"]  # b.d
    has_bias: bool
    writes: dict[int, Tensor] = field(default_factory=dict)  # kept block -> [token, head, d_model]
    bias: dict[int, Tensor] = field(default_factory=dict)  # kept block -> [token, d_model]

    @property
    def n_heads(self) -> int:
        return self.cross.shape[-1]

    def __repr__(self) -> str:
        block, token, head = self.cross.shape
        return (f"HeadWrites(blocks={block}, tokens={token}, heads={head}, bias={self.has_bias}, "
                f"kept writes of blocks {sorted(self.writes)})")


def head_writes(
    z: Float[Tensor, "*lead head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "*lead head d_model"]:
    """``d_h = z_h W_O^h``: each head's write, before the output bias.

    >>> head_writes(torch.ones(1, 2, 1), torch.tensor([[[1., 2.]], [[3., 0.]]])).tolist()
    [[[1.0, 2.0], [3.0, 0.0]]]
    """
    return torch.einsum("...hk,hkm->...hm", z, W_O.to(z.dtype))


def write_terms(
    h: Float[Tensor, "*lead d_model"], d: Float[Tensor, "*lead d_model"], writes: Float[Tensor, "*lead head d_model"]
) -> tuple[Float[Tensor, "*lead head"], Float[Tensor, "*lead head"], Float[Tensor, "*lead head"]]:
    """``(2 h.d_h, d_h.d, ||d_h||)`` per head, in float64: a head's parts of ``||h + d||^2 - ||h||^2``.

    >>> cross, overlap, norm = write_terms(torch.tensor([1., 0.]), torch.tensor([1., 1.]),
    ...                                    torch.tensor([[1., 0.], [0., 1.]]))
    >>> cross.tolist(), overlap.tolist(), norm.tolist()
    ([2.0, 0.0], [1.0, 1.0], [1.0, 1.0])
    """
    # Dot products in the activations' dtype (one pass), float64 from here on, as expansion's growth terms.
    cross = 2.0 * torch.linalg.vecdot(writes, h.unsqueeze(-2)).to(torch.float64)
    overlap = torch.linalg.vecdot(writes, d.unsqueeze(-2)).to(torch.float64)
    norm = torch.linalg.vector_norm(writes, dim=-1, dtype=torch.promote_types(writes.dtype, torch.float32))
    return cross, overlap, norm.to(torch.float64)


def norm_gain(
    normalized: Float[Tensor, "token d_model"], out: Float[Tensor, "token d_model"]
) -> Float[Tensor, " d_model"]:
    """The elementwise gain ``g`` of ``out = g * normalized``, by least squares over tokens (0 where a
    dimension is zero on every token, as its output then is).

    >>> norm_gain(torch.tensor([[1., 0.], [2., 0.]]), torch.tensor([[3., 0.], [6., 0.]])).tolist()
    [3.0, 0.0]
    """
    den = (normalized * normalized).sum(0)
    return torch.where(den > 0, (out * normalized).sum(0) / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def check_head_hooks(model) -> None:
    """Fail at once, naming the model and its layout, where per-head writes cannot be read."""
    layout = block_layout(model)
    names = set(model.hook_dict)
    needed = ["blocks.0.attn.hook_z", *(f"blocks.0.ln1_post.{hook}" for hook in ("hook_scale", "hook_normalized", "hook_out")
                                         if layout.name == "post-sublayer-norm")]
    missing = [name for name in needed if name not in names]
    info = getattr(model, "lensdyn_info", None)
    label = f"{getattr(info, 'name', type(model).__name__)} ({layout.name} blocks)"
    if missing:
        raise UnsupportedArchitectureError(f"{label} has no hook point {missing[0]}: per-head writes read each head's "
                                           "z (hook_z) and its W_O, so they are not available for this model")
    try:
        model.blocks[0].attn.W_O
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"{label}: attention exposes no per-head W_O ({err})") from err


def head_capture(
    model,
    prompts,
    *,
    keep: Sequence[int] = (),
    streams: Sequence[str] = HEAD_STREAMS,
    batch_size: int = 8,
    **capture_kwargs,
) -> tuple[Capture, HeadWrites]:
    """``ld.capture`` of ``streams`` and, in the same pass, every head's write reduced per token.

    Args:
        keep: blocks whose full per-head writes ``[token, head, d_model]`` are kept too (module docstring: memory).
        streams, batch_size, capture_kwargs: as ``lensdyn.hooks.capture.capture``.
    """
    n_layers = model.cfg.n_layers
    bad = [b for b in keep if not (isinstance(b, int) and 0 <= b < n_layers)]
    if bad:
        raise ArgumentError(f"keep= takes block indices 0..{n_layers - 1}, not {bad}")
    check_head_hooks(model)
    layout = block_layout(model)
    reducer = _Reducer(model, layout.name, frozenset(keep))
    cap = capture(model, prompts, streams=streams, batch_size=batch_size, fwd_hooks=reducer.hooks(), **capture_kwargs)
    return cap, reducer.assemble(cap.token_mask, batch_size)


@dataclass
class _Reducer:
    """The hook functions that reduce each batch's head writes, and the per-batch results they leave."""

    model: object
    layout: str
    keep: frozenset[int]
    batches: list[dict[int, tuple[Tensor, ...]]] = field(default_factory=list)  # per pass: block -> padded results
    _state: dict[str, Tensor] = field(default_factory=dict)

    def hooks(self) -> list[tuple[str, object]]:
        hooks = []
        attn_out = {"post-norm": "ln1.hook_in"}.get(self.layout, "hook_attn_out")
        for l in range(self.model.cfg.n_layers):
            b = f"blocks.{l}"
            hooks += [(f"{b}.hook_resid_pre", self._stash("h", l)), (f"{b}.attn.hook_z", self._stash("z", l))]
            if self.layout == "post-sublayer-norm":
                hooks += [(f"{b}.ln1_post.{name}", self._stash(name, l))
                          for name in ("hook_scale", "hook_normalized", "hook_out")]
            hooks.append((f"{b}.{attn_out}", self._reduce(l)))
        return hooks

    def _stash(self, name: str, block: int):
        def hook_fn(x: Tensor, hook) -> Tensor:
            if name == "h" and block == 0:  # the first hook of a forward pass: a new batch
                self.batches.append({})
            self._state[name] = x
            return x

        return hook_fn

    def _reduce(self, block: int):
        def hook_fn(x: Tensor, hook) -> Tensor:
            state = self._state
            h, attn = state["h"], self.model.blocks[block].attn
            d = x - h if self.layout == "post-norm" else x  # post-norm: what LN1 reads minus the residual
            writes = head_writes(state["z"], attn.W_O.detach())
            b_O = getattr(attn, "b_O", None)
            bias = torch.zeros_like(d) if b_O is None else b_O.detach().to(d.dtype).expand_as(d)
            if self.layout == "post-sublayer-norm":
                # N1 with its divisor frozen is linear: each head's write goes through it alone.
                gain = norm_gain(state["hook_normalized"].flatten(0, -2), state["hook_out"].flatten(0, -2))
                factor = gain / state["hook_scale"]
                writes, bias = writes * factor.unsqueeze(-2), bias * factor
            cross, overlap, norm = write_terms(h, d, writes)
            bias_cross, bias_overlap = (t.squeeze(-1) for t in write_terms(h, d, bias.unsqueeze(-2))[:2])
            kept = (writes.cpu(), bias.cpu()) if block in self.keep else ()
            self.batches[-1][block] = (cross, overlap, norm, bias_cross, bias_overlap, *kept)
            state.clear()
            return x

        return hook_fn

    def assemble(self, token_mask: Bool[Tensor, "batch pos"], batch_size: int) -> HeadWrites:
        """The per-batch results in the capture's packed order (its batches: ``capture._length_batches``)."""
        lengths = token_mask.sum(1).tolist()
        order = _length_batches(lengths, batch_size)
        n_layers = self.model.cfg.n_layers
        if len(order) != len(self.batches) or any(len(b) != n_layers for b in self.batches):
            raise HookSemanticsError(f"per-head hooks fired in {len(self.batches)} passes for {len(order)} batches: "
                                     "the capture did not run every block's attention once per batch")
        starts = torch.cumsum(token_mask.sum(1), 0) - token_mask.sum(1)
        n_real = int(token_mask.sum())
        n_heads = self.batches[0][0][0].shape[-1]
        out = [torch.empty(n_layers, n_real, n_heads, dtype=torch.float64) for _ in range(3)]
        out += [torch.empty(n_layers, n_real, dtype=torch.float64) for _ in range(2)]
        writes = {l: [] for l in sorted(self.keep)}
        pieces = []
        for rows, results in zip(order, self.batches):
            length = max(lengths[r] for r in rows)
            mask = token_mask[rows, :length]
            destination = torch.cat([torch.arange(lengths[r]) + starts[r] for r in rows])
            pieces.append(destination)
            for l, values in results.items():
                for target, value in zip(out, values[:5]):
                    target[l, destination] = value[mask.to(value.device)].cpu()
                if l in writes:
                    writes[l].append(tuple(v[mask] for v in values[5:]))
        order_back = torch.argsort(torch.cat(pieces))
        kept = {l: torch.cat([w for w, _ in parts])[order_back] for l, parts in writes.items()}
        kept_bias = {l: torch.cat([b for _, b in parts])[order_back] for l, parts in writes.items()}
        has_bias = getattr(self.model.blocks[0].attn, "b_O", None) is not None
        return HeadWrites(*out, has_bias=has_bias, writes=kept, bias=kept_bias)
