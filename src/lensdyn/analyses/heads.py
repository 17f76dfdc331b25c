"""Per-head contributions: each attention head's part of the residual's growth, its gains, its OV radius.

Block ``l``'s attention writes ``d = sum_h d_h + b`` into its input ``x = resid[l]`` (``lensdyn.hooks.heads``:
``d_h = z_h W_O^h``, the output bias ``b`` apart; through a post-sublayer norm with its divisor frozen).
Expansion's attention growth term is ``||x + d||^2 - ||x||^2 = 2 x.d + ||d||^2``. Each head's part:

    growth[l, h] = mean over tokens of  2 x.d_h + d_h.d

and the bias's ``bias_growth[l] = mean(2 x.b + b.d)``. Because ``||d||^2 = sum_h d_h.d + b.d``, each cross
term ``d_h.d_k`` between two heads is split evenly (half to each) and ``sum_h growth[l, h] + bias_growth[l]``
is expansion's ``attn_growth[l]`` exactly (both read the same tokens; tested to 1e-6). A head's part can
be negative (it shrinks the residual).

- ``share[l, h] = growth[l, h] / sum_{l', h'} |growth[l', h']|``: a head's fraction of all the heads'
  growth, signed, comparable between a model and its untrained control. ``ranking`` orders every
  (block, head) by ``|share|``, largest first.
- per-head gains under the named references of ``lensdyn.analyses.gains``, ratio of means over tokens
  (``lensdyn.conventions``, 4): ``gain_ln_output[l, h] = mean ||d_h|| / mean ||attn_in[l]||`` (what
  attention reads) and ``gain_resid[l, h] = mean ||d_h|| / mean ||resid[l]||`` (the residual it writes into).
- ``ov_radius[l, h]``: the spectral radius of the head's OV circuit ``W_V^h W_O^h``
  (``lensdyn.hooks.circuits.circuit_spectra``), beside its share.

Every statistic is a ratio of per-prompt sums (``prompt_parts``), so ``resample`` re-pools them on a
bootstrap draw of the prompts. No write-up states a per-head claim: this analysis judges none.

Cost (``benchmarks/heads.py``, smollm2-135m, diverse set, 2 shared CPU cores): the reduction rides on the
capture's pass, 1.07x the plain capture of ``STREAMS`` (1.16x keeping three blocks' full writes). Given
the report's shared capture it runs that pass again (``hook_z`` is not a capture stream): 1.04x a
capture per run (the model and each untrained control), where the default report takes about 3.8 bare
forward passes per run in all (README, speed). So it is opt-in: ``lensdyn report --analyses ...,heads``.

>>> result = heads.measure(ld.load_model("smollm2-135m"), "diverse")     # doctest: +SKIP
>>> print(result.summary())                                              # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn.analyses.registry import Analysis, option
from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import Capture
from lensdyn.hooks.circuits import circuit_spectra
from lensdyn.hooks.heads import HeadWrites, head_capture
from lensdyn.models import model_info, random_control
from lensdyn.ops import prompt_index, to_numpy, token_norms
from lensdyn.resampling import prompt_counts, prompt_sums
from lensdyn.results import Conventions, Provenance, Result, attach_control

STREAMS = ("resid", "attn_in", "attn_out")
# The per-prompt sums every statistic is pooled from, in this order along prompt_parts' first axis.
PARTS = ("growth", "write_norm", "attn_in_norm", "resid_norm", "bias_growth", "tokens")


# --- pure functions of tensors -------------------------------------------------------------


def head_parts(
    cross: Float[Tensor, "block token head"], overlap: Float[Tensor, "block token head"],
    norm: Float[Tensor, "block token head"], bias_growth: Float[Tensor, "block token"],
    attn_in_norm: Float[Tensor, "block token"], resid_norm: Float[Tensor, "block token"],
    owners: Int[np.ndarray, " token"], n_prompts: int,
) -> Float[np.ndarray, "part prompt block head"]:
    """Per-prompt sums of ``PARTS`` over the given tokens (block-level parts repeated over heads).

    >>> one = torch.ones(1, 2, 1)
    >>> parts = head_parts(one, one, one, one[..., 0], 2 * one[..., 0], one[..., 0], np.array([0, 1]), 2)
    >>> parts.shape, parts[:, 0, 0, 0].tolist()
    ((6, 2, 1, 1), [2.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    """
    n_heads = cross.shape[-1]
    per_head = [cross + overlap, norm]
    per_block = [attn_in_norm, resid_norm, bias_growth, torch.ones_like(resid_norm)]
    sums = [prompt_sums(to_numpy(v.transpose(1, 2).flatten(0, 1) if v.dim() == 3 else v), owners, n_prompts)
            for v in (*per_head, *per_block)]
    shape = (n_prompts, cross.shape[0], n_heads)
    return np.stack([s.reshape(shape) if i < 2 else np.repeat(s[:, :, None], n_heads, axis=2)
                     for i, s in enumerate(sums)])


def head_statistics(parts: Float[np.ndarray, "part prompt block head"], counts: Int[np.ndarray, " prompt"]) -> dict:
    """Every per-head statistic (module docstring) pooled from ``parts`` with prompt weights ``counts``.

    Two heads of one block, one token: growths 3 and -1 (bias 0) give shares 0.75 and -0.25.

    >>> parts = np.zeros((6, 1, 1, 2)); parts[0, 0, 0] = [3., -1.]; parts[1:4] = 1.; parts[5] = 1.
    >>> stats = head_statistics(parts, np.array([1]))
    >>> stats["share"].tolist(), stats["attn_growth"].tolist(), stats["ranking"].tolist()
    ([[0.75, -0.25]], [2.0], [[0, 0], [0, 1]])
    """
    growth, write_norm, attn_in_norm, resid_norm, bias_growth, tokens = np.einsum("p,kpbh->kbh", counts, parts)
    growth, bias_growth = growth / tokens, bias_growth[:, 0] / tokens[:, 0]
    total = np.abs(growth).sum()
    share = growth / total if total > 0 else np.full_like(growth, np.nan)
    order = np.argsort(-np.abs(share), axis=None, kind="stable")
    return dict(
        growth=growth,
        bias_growth=bias_growth,
        attn_growth=growth.sum(axis=1) + bias_growth,
        share=share,
        ranking=np.stack(np.unravel_index(order, share.shape), axis=1),
        gain_ln_output=write_norm / attn_in_norm,
        gain_resid=write_norm / resid_norm,
    )


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadsResult(Result):
    """Per block x head statistics of one model (module docstring); ``control``: its untrained twin's."""

    growth: Float[np.ndarray, "block head"]
    bias_growth: Float[np.ndarray, " block"]
    attn_growth: Float[np.ndarray, " block"]
    share: Float[np.ndarray, "block head"]
    ranking: Int[np.ndarray, "rank 2"]  # (block, head), by |share|, largest first
    gain_ln_output: Float[np.ndarray, "block head"]
    gain_resid: Float[np.ndarray, "block head"]
    ov_radius: Float[np.ndarray, "block head"]
    has_bias: bool
    top_heads: int = 10
    control: "HeadsResult | None" = None
    prompt_parts: Float[np.ndarray, "part prompt block head"] | None = None

    @property
    def n_layers(self) -> int:
        return self.growth.shape[0]

    @property
    def n_heads(self) -> int:
        return self.growth.shape[1]

    def resample(self, rng: np.random.Generator) -> "HeadsResult | None":
        """The statistics on prompts drawn with replacement, pooled from ``prompt_parts`` (None without them)."""
        if self.prompt_parts is None:
            return None
        counts = prompt_counts(rng, self.provenance.n_prompts)
        return dataclasses.replace(self, **head_statistics(self.prompt_parts, counts), prompt_parts=None)

    def top(self, n: int | None = None) -> list[tuple[int, int]]:
        """The ``n`` (default ``top_heads``) heads of largest ``|share|``, as (block, head)."""
        return [tuple(map(int, bh)) for bh in self.ranking[: self.top_heads if n is None else n]]

    def summary(self) -> str:
        p = self.provenance
        lines = [
            f"Per-head contributions: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, "
            f"{p.n_tokens} tokens; {self.n_layers} blocks x {self.n_heads} heads; {self.conventions.aggregation}",
            "share = the head's part of attention's growth term 2 x.d_h + d_h.d over all heads' |parts|; "
            "gains ||d_h|| / ||attn_in|| and / ||resid||",
        ]
        for r in (self, self.control):
            if r is None:
                continue
            rp = r.provenance
            bias = f"; output bias's part of the growth {r.bias_growth.sum():+.4g}" if r.has_bias else ""
            lines.append(f"top {r.top_heads} heads of {rp.model} ({rp.weights}){bias}")
            lines.append(f"{'rank':>4} {'block':>5} {'head':>4} {'share':>8} {'growth':>11} {'gain ln':>8} "
                         f"{'gain res':>8} {'OV rho':>8}")
            for rank, (l, h) in enumerate(r.top(), 1):
                lines.append(f"{rank:>4} {l:>5} {h:>4} {r.share[l, h]:>+8.3f} {r.growth[l, h]:>+11.4g} "
                             f"{r.gain_ln_output[l, h]:>8.3f} {r.gain_resid[l, h]:>8.4f} {r.ov_radius[l, h]:>8.3f}")
        return "\n".join(lines)

    def figure(self):
        """Block x head heat map of the share, greyscale (zero mid-grey); the control in a second panel."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        shown = [r for r in (self, self.control) if r is not None]
        fig = make_subplots(rows=1, cols=len(shown), horizontal_spacing=0.08, subplot_titles=[
            f"{r.provenance.model} ({r.provenance.weights})" for r in shown])
        limit = max(float(np.nanmax(np.abs(r.share))) for r in shown) or 1.0
        for col, r in enumerate(shown, 1):
            fig.add_trace(go.Heatmap(
                z=r.share, x=np.arange(r.n_heads), y=np.arange(r.n_layers), zmin=-limit, zmax=limit,
                colorscale=[[0.0, "white"], [1.0, "black"]], showscale=col == 1, colorbar={"title": "share"},
                hovertemplate="block %{y}, head %{x}: share %{z:+.3f}<extra></extra>"), row=1, col=col)
            fig.update_xaxes(title_text="head", row=1, col=col)
            fig.update_yaxes(title_text="block", autorange="reversed", row=1, col=col)
        fig.update_layout(title="Each head's share of attention's growth term (signed; white shrinks, black grows)",
                          template="plotly_white", height=max(360, 18 * self.n_layers + 160))
        return fig


# --- measurement ---------------------------------------------------------------------------


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    top_heads: int = 10,
    **capture_kwargs,
) -> HeadsResult:
    """Per-head contributions of a model (run on ``prompts``) or of the prompts of a ``Capture`` (pass ``model=``).

    Given a Capture, the head reduction runs its prompts through ``model`` again (``hook_z`` is not a
    capture stream) and reads ``STREAMS`` from the capture where it holds them. ``control="random"``
    measures the untrained twin on the same tokens; a ``HeadsResult`` is attached as is; None skips it.
    """
    if top_heads < 1:
        raise ArgumentError(f"top_heads must be at least 1, not {top_heads}")
    if isinstance(capture_or_model, Capture):
        if model is None:
            raise ArgumentError("heads.measure(capture) needs model= too: the heads' writes are read from its hook_z "
                                "and W_O in a forward pass")
        if model_info(model) != capture_or_model.model_info:
            raise ArgumentError(f"model= is {model_info(model).name} ({model_info(model).weights}), but the capture is of "
                                f"{capture_or_model.model_info.name} ({capture_or_model.model_info.weights})")
        cap, writes = _again(model, capture_or_model, tuple(s for s in STREAMS if s not in capture_or_model.packed))
    else:
        model = capture_or_model
        cap, writes = head_capture(model, prompts, streams=STREAMS, **capture_kwargs)
    result = _measure(cap, writes, model, top_heads)

    def measure_random() -> HeadsResult:
        random_model = random_control(model)
        return _measure(*_again(random_model, cap, STREAMS, merge=False), random_model, top_heads)

    return attach_control(result, control, measure_random)


def _again(model, like: Capture, streams: tuple[str, ...], merge: bool = True) -> tuple[Capture, HeadWrites]:
    """``head_capture`` of ``like``'s prompts with its exclusions; with ``merge``, the streams it holds are read from it."""
    cap, writes = head_capture(model, like.same_prompts(), streams=streams, exclude=like.exclude,
                               truncate=bool(like.truncated), massive_from=like if "massive" in like.exclude else None)
    if not torch.equal(cap.tokens, like.tokens):
        raise ArgumentError("the capture's prompts tokenise differently here (another prepend_bos?): "
                            "pass the model and prompts to heads.measure instead")
    if merge:
        cap = dataclasses.replace(cap, packed={**like.packed, **cap.packed})
    return cap, writes


def _measure(cap: Capture, writes: HeadWrites, model, top_heads: int) -> HeadsResult:
    cap.require_streams(STREAMS)
    keep = cap.mask[cap.token_mask]
    owners = to_numpy(prompt_index(cap.mask))
    attn_in_norm, resid_norm = token_norms(cap.tokens_of("attn_in")), token_norms(cap.tokens_of("resid")[:-1])
    parts = head_parts(writes.cross[:, keep], writes.overlap[:, keep], writes.norm[:, keep],
                       (writes.bias_cross + writes.bias_overlap)[:, keep], attn_in_norm, resid_norm, owners, cap.n_prompts)
    return HeadsResult(
        conventions=Conventions(
            aggregation="ratio of means over included tokens pooled; cross terms between heads split evenly "
            "(||d||^2 = sum_h d_h.d + b.d)",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        ov_radius=np.asarray(circuit_spectra(model).ov_head_radius, dtype=np.float64),
        has_bias=writes.has_bias,
        top_heads=top_heads,
        prompt_parts=parts,
        **head_statistics(parts, np.ones(cap.n_prompts, dtype=np.int64)),
    )


@dataclass(frozen=True)
class HeadsParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    top_heads: int = option(10, "heads listed in the summary, by |share|", at_least=1)


ANALYSIS = Analysis(
    name="heads",
    help="each attention head's share of the growth term, per-head gains and OV radius, block x head heat map",
    heading="Per-head contributions",
    order=35,
    streams=STREAMS,
    result=HeadsResult,
    measure=measure,
    parameters=HeadsParameters,
    opt_in=True,  # one more forward pass per run (module docstring: cost)
)
