"""Sublayer gains: how much each attention and MLP sublayer amplifies what it reads.

The Pythia write-up (1.4B / 6.9B) claims attention contracts in every block, the last MLP
expands 3.6x / 6.24x, and "final MLP gain ~ params^0.35" from two models. Its gain is
``mean ||sublayer out|| / mean ||LayerNorm output||`` over all tokens. lensdyn names every choice:

- ``reference="ln_output"`` (the write-up's): relative to what the sublayer reads, ``attn_in`` /
  ``mlp_in`` (the norm's output with its gain; on post-norm models the residual itself).
- ``reference="resid"``: relative to the residual the sublayer writes into (``resid_pre`` for
  attention, ``resid_mid`` for the MLP; ``resid_pre`` for both on parallel blocks such as
  Pythia's, ``lensdyn.layouts``): the sublayer's update relative to the stream.
- ``resid_gain[l] = ||resid[l+1]|| / ||resid[l]||`` per block, before the final norm (the
  write-up's pythia-70m list ends in 27.9 because its last entry includes the final norm).
- ``aggregation``: ``"ratio_of_means"`` (default) or ``"mean_of_ratios"``; ``tokens``: ``"all"``
  included tokens or each prompt's ``"last"`` token only.

A gain below 1 is contracting, above 1 expanding. ``mlp_phases`` segments ``log mlp_gain`` into
piecewise-constant runs by the BIC rule of ``lensdyn.fits.piecewise_constant_segments``; each run
is labelled by its geometric-mean gain: ``expanding`` (> 1 + band), ``contracting``
(< 1 / (1 + band)) or ``neutral``, and marked ``final`` when it is a run of at most two blocks
ending at the last block; neighbouring runs with the same label are one phase.
``scaling([results...])`` fits the last MLP gain against parameter count.

>>> result = gains.measure(ld.load_model("smollm2-135m"), "diverse")     # doctest: +SKIP
>>> print(result.summary())                                              # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from torch import Tensor

from lensdyn import citations, plots
from lensdyn.errors import ArgumentError
from lensdyn.fits import line_fit, piecewise_constant_segments
from lensdyn.hooks.capture import Capture
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.ops import AGGREGATIONS, aggregate_ratio, last_token_mask, prompt_index, to_numpy, token_norms
from lensdyn.resampling import pooled_ratio, prompt_counts, ratio_band, ratio_parts
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.verdicts import Claim, finite

STREAMS = ("resid", "resid_mid", "attn_in", "attn_out", "mlp_in", "mlp_out")
REFERENCES = ("ln_output", "resid")
TOKENS = ("all", "last")
NEUTRAL_BAND = 0.1


# --- pure functions of tensors -------------------------------------------------------------


def sublayer_gain(
    output: Float[Tensor, "block token d_model"],
    reference: Float[Tensor, "block token d_model"],
    aggregation: str = "ratio_of_means",
) -> Float[np.ndarray, " block"]:
    """``||output|| / ||reference||`` per block over the given tokens, aggregated as named.

    >>> out, ref = torch.tensor([[[3., 4.]]]), torch.tensor([[[1., 0.]]])
    >>> sublayer_gain(out, ref)
    array([5.])
    """
    return to_numpy(aggregate_ratio(token_norms(output), token_norms(reference), aggregation))


def count_contracting(gain: Float[np.ndarray, " block"]) -> tuple[int, int]:
    """``(#blocks with gain < 1, #blocks with gain > 1)``.

    >>> count_contracting(np.array([0.5, 1.0, 2.0]))
    (1, 1)
    """
    return int((gain < 1).sum()), int((gain > 1).sum())


@dataclass(frozen=True)
class Phase:
    """A run of blocks ``start..end`` (inclusive) with one level of MLP gain."""

    start: int
    end: int
    gain: float  # geometric mean over the run
    label: str


def gain_phases(gain: Float[np.ndarray, " block"], band: float = NEUTRAL_BAND, max_segments: int = 6) -> tuple[Phase, ...]:
    """Segment ``log gain`` by the BIC change-point rule and label each run (module docstring).

    >>> [p.label for p in gain_phases(np.array([2., 2.1, 1.9, 1., 1., 1.02, .98, 1., .5, .52, .49, 6.]))]
    ['expanding', 'neutral', 'contracting', 'final expanding']
    """
    log_gain = np.log(gain)
    starts = list(piecewise_constant_segments(log_gain, max_segments)) + [len(gain)]
    runs: list[tuple[int, int, str]] = []  # (start, stop, label); neighbours with one label merge
    for start, stop in zip(starts[:-1], starts[1:]):
        level = float(np.exp(log_gain[start:stop].mean()))
        label = "expanding" if level > 1 + band else "contracting" if level < 1 / (1 + band) else "neutral"
        if stop == len(gain) and stop - start <= 2 and start > 0:
            label = f"final {label}"
        if runs and runs[-1][2] == label:
            runs[-1] = (runs[-1][0], stop, label)
        else:
            runs.append((start, stop, label))
    phases = [
        Phase(start=int(a), end=int(b - 1), gain=float(np.exp(log_gain[a:b].mean())), label=label) for a, b, label in runs
    ]
    return tuple(phases)


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GainsResult(Result):
    """Per-block gains of one model; ``control`` holds the untrained model's, measured alike."""

    attn_gain: Float[np.ndarray, " block"]
    mlp_gain: Float[np.ndarray, " block"]
    resid_gain: Float[np.ndarray, " block"]
    reference: str
    tokens: str
    attn_contracting: int
    attn_expanding: int
    mlp_contracting: int
    mlp_expanding: int
    resid_contracting: int
    resid_expanding: int
    attn_argmax: int
    mlp_argmax: int
    attn_min: float
    mlp_max: float
    last_mlp_gain: float
    mlp_phases: tuple[Phase, ...]
    control: "GainsResult | None" = None
    band: float = NEUTRAL_BAND
    # Per prompt, the sums each gain divides (lensdyn.resampling.ratio_parts), for attn, mlp, resid.
    prompt_parts: Float[np.ndarray, "sublayer part prompt block"] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.attn_gain)

    def resample(self, rng: np.random.Generator) -> "GainsResult | None":
        """The gains on prompts drawn with replacement, pooled from ``prompt_parts`` (None without them)."""
        if self.prompt_parts is None:
            return None
        counts = prompt_counts(rng, self.provenance.n_prompts)
        attn, mlp, resid = (pooled_ratio(num, den, counts) for num, den in self.prompt_parts)
        return dataclasses.replace(self, **gain_fields(attn, mlp, resid, self.band), prompt_parts=None)


    def summary(self) -> str:
        p, c, n = self.provenance, self.control, self.n_layers
        lines = [
            f"Sublayer gains: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, "
            f"{p.n_tokens} tokens; reference {self.reference!r}, tokens {self.tokens!r}, {self.conventions.aggregation}",
            f"{'':30}{'model':>16}{'control':>16}   write-up (Pythia-1.4B / 6.9B)",
        ]

        def row(label: str, get, claim: str) -> None:
            lines.append(f"{label:30}{get(self):>16}{get(c) if c is not None else '-':>16}   {claim}")

        row("attention contracting", lambda r: f"{r.attn_contracting}/{r.n_layers}", "24/24, 32/32")
        row("attention min gain (block)", lambda r: f"{r.attn_min:.3f} ({int(np.argmin(r.attn_gain))})", "0.083, 0.079")
        row("MLP contracting", lambda r: f"{r.mlp_contracting}/{r.n_layers}", "22/24, 18/32")
        row("MLP max gain (block)", lambda r: f"{r.mlp_max:.2f} ({r.mlp_argmax})", "3.60 (L23), 6.24 (L31)")
        row("last-block MLP gain", lambda r: f"{r.last_mlp_gain:.2f}", "3.60, 6.24")
        row("max MLP gain at last block", lambda r: "yes" if r.mlp_argmax == r.n_layers - 1 else "no", "yes, yes")
        row("residual contracting", lambda r: f"{r.resid_contracting}/{r.n_layers}", "23/24, 30/32 ('net')")
        lines.append("MLP phases: " + "; ".join(f"{ph.label} {ph.start}-{ph.end} (x{ph.gain:.2f})" for ph in self.mlp_phases))
        lines.append(f"{'block':>5} {'attn':>8} {'mlp':>8} {'resid':>8}")
        for l in range(n):
            lines.append(f"{l:>5} {self.attn_gain[l]:>8.3f} {self.mlp_gain[l]:>8.3f} {self.resid_gain[l]:>8.3f}")
        return "\n".join(lines)

    def figure(self):
        """Attention, MLP and residual gain per block (log scale), MLP phases shaded, control in grey."""
        import plotly.graph_objects as go

        fig = go.Figure()
        palette = {"attn": "#1f77b4", "mlp": "#d62728", "resid": "#2ca02c"}
        for r, grey in ((self, False), (self.control, True)):
            if r is None:
                continue
            tag = "control" if grey else "model"
            blocks = np.arange(r.n_layers)
            for k, (key, values) in enumerate((("attn", r.attn_gain), ("mlp", r.mlp_gain), ("resid", r.resid_gain))):
                if r.prompt_parts is not None and r.provenance.n_prompts >= 2:
                    low, high = ratio_band(r.prompt_parts[k])
                    fig.add_trace(plots.band(blocks, low, high, "#999999" if grey else palette[key],
                                             f"{tag}: {key}, 90% bootstrap band over prompts", legendgroup=f"{tag} {key}"))
                fig.add_trace(go.Scatter(
                    x=blocks, y=values, mode="lines+markers", name=f"{tag}: {key} gain", legendgroup=f"{tag} {key}",
                    line={"color": "#999999" if grey else palette[key], "dash": "dot" if grey else "solid"},
                    marker={"symbol": {"attn": "circle", "mlp": "square", "resid": "diamond"}[key]},
                ))
        for i, ph in enumerate(self.mlp_phases):
            fig.add_vrect(x0=ph.start - 0.5, x1=ph.end + 0.5, fillcolor="#d62728", opacity=0.04 + 0.05 * (i % 2), line_width=0,
                          annotation_text=ph.label, annotation_position="top left", annotation_font_size=10)
        fig.add_hline(y=1.0, line={"color": "black", "width": 1, "dash": "dash"})
        fig.update_layout(
            title=f"Sublayer gains of {self.provenance.model} ({self.provenance.weights})"
            + (f", control (grey): {self.control.provenance.weights} weights" if self.control else "")
            + f"<br><sup>reference {self.reference!r}, tokens {self.tokens!r}; below 1 contracts</sup>",
            xaxis_title="block l", yaxis_title="gain = ||sublayer out|| / ||reference|| (log axis)", yaxis_type="log",
            yaxis=plots.log_ticks([r.attn_gain for r in (self, self.control) if r is not None]
                                  + [r.mlp_gain for r in (self, self.control) if r is not None]),
            template="plotly_white", height=520,
        )
        return fig


PYTHIA = citations.PYTHIA.source
GAIN_UNITS = "gain: ||sublayer output|| / ||its reference|| (a ratio of norms, dimensionless)"
CLAIMS = (
    Claim(PYTHIA, "attention always contracts", "attention gain < 1 in every block (reference as measured)",
          lambda r: (f"{r.attn_contracting}/{r.n_layers} blocks (min {r.attn_min:.2f})", r.attn_contracting == r.n_layers),
          units=GAIN_UNITS),
    Claim(PYTHIA, "MLP mostly contracts", "MLP gain < 1 in more than half the blocks",
          lambda r: (f"{r.mlp_contracting}/{r.n_layers} blocks", r.mlp_contracting > r.n_layers / 2)),
    Claim(PYTHIA, "last MLP expands", "last block's MLP gain > 1",
          lambda r: (f"{r.last_mlp_gain:.2f}x", finite(r.last_mlp_gain > 1, r.last_mlp_gain)), units=GAIN_UNITS),
    Claim(PYTHIA, "last MLP gain is the maximum", "argmax of the MLP gain is the last block",
          lambda r: (f"max at block {r.mlp_argmax} of {r.n_layers}", r.mlp_argmax == r.n_layers - 1)),
    Claim(PYTHIA, "net expansion only in the last block", "residual gain > 1 in the last block and in no other",
          lambda r: (f"{r.resid_expanding}/{r.n_layers} blocks expand",
                     r.resid_expanding == 1 and bool(r.resid_gain[-1] > 1))),
    Claim(PYTHIA, "last-MLP gain scales with model size", "a fit over >= 3 model sizes (gains.scaling)",
          lambda r: ("one model", None)),
)
GainsResult.claims = CLAIMS


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    reference: str = "ln_output",
    aggregation: str = "ratio_of_means",
    tokens: str = "all",
    band: float = NEUTRAL_BAND,
    **capture_kwargs,
) -> GainsResult:
    """Gains of a model (captured here) or of a ``Capture`` holding ``STREAMS``.

    ``control="random"`` (default) measures the same architecture with random weights on the
    same prompts (a ``Capture`` then needs ``model=``, a model from ``ld.load_model``); a
    ``GainsResult`` is attached as is; None skips it.
    """
    for name, value, allowed in (("reference", reference, REFERENCES), ("tokens", tokens, TOKENS)):
        if value not in allowed:
            raise ArgumentError(f"{name} must be one of {allowed}, not {value!r}")
    def measure_one(cap: Capture, model) -> GainsResult:
        return _measure_capture(cap, reference, aggregation, tokens, band)

    return measure_with_control("gains", capture_or_model, prompts, STREAMS, measure_one, model=model, control=control,
                                **capture_kwargs)


def _measure_capture(cap: Capture, reference: str, aggregation: str, tokens: str, band: float) -> GainsResult:
    cap.require_streams(STREAMS, allow_absent=True)
    mask = cap.mask & last_token_mask(cap.token_mask) if tokens == "last" else cap.mask
    if not bool(mask.any()):
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    resid_tokens = cap.tokens_of("resid", mask)
    if reference == "ln_output":
        attn_ref, mlp_ref = cap.tokens_of("attn_in", mask), cap.tokens_of("mlp_in", mask)
    else:
        attn_ref, mlp_ref = resid_tokens[:-1], cap.mlp_writes_into(mask)
    owners = to_numpy(prompt_index(mask))
    # Per-prompt sums first: the gains are their pooled ratio, and a bootstrap resample re-pools them.
    parts = np.stack([ratio_parts(to_numpy(token_norms(out)), to_numpy(token_norms(ref)), owners, cap.n_prompts, aggregation)
                      for out, ref in ((cap.tokens_of("attn_out", mask), attn_ref), (cap.tokens_of("mlp_out", mask), mlp_ref),
                                       (resid_tokens[1:], resid_tokens[:-1]))])
    attn, mlp, resid = (pooled_ratio(num, den, np.ones(cap.n_prompts, dtype=np.int64)) for num, den in parts)
    return GainsResult(
        conventions=Conventions(
            aggregation=f"{aggregation.replace('_', ' ')} over "
            + ("each prompt's last token" if tokens == "last" else "included tokens"),
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        reference=reference,
        tokens=tokens,
        band=band,
        prompt_parts=parts,
        **gain_fields(attn, mlp, resid, band),
    )


def gain_fields(attn: Float[np.ndarray, " block"], mlp: Float[np.ndarray, " block"], resid: Float[np.ndarray, " block"],
                band: float) -> dict:
    """Every ``GainsResult`` field derived from the three gain curves (measure and resample share it)."""
    counts = {name: count_contracting(g) for name, g in (("attn", attn), ("mlp", mlp), ("resid", resid))}
    return dict(
        attn_gain=attn,
        mlp_gain=mlp,
        resid_gain=resid,
        attn_contracting=counts["attn"][0],
        attn_expanding=counts["attn"][1],
        mlp_contracting=counts["mlp"][0],
        mlp_expanding=counts["mlp"][1],
        resid_contracting=counts["resid"][0],
        resid_expanding=counts["resid"][1],
        attn_argmax=int(np.argmax(attn)),
        mlp_argmax=int(np.argmax(mlp)),
        attn_min=float(attn.min()),
        mlp_max=float(mlp.max()),
        last_mlp_gain=float(mlp[-1]),
        mlp_phases=gain_phases(mlp, band),
    )


# --- across models -------------------------------------------------------------------------


@dataclass(frozen=True)
class GainScaling:
    """``last_mlp_gain = exp(c) * n_params ** exponent`` fitted across models (OLS in log-log)."""

    exponent: float
    exponent_se: float
    intercept: float
    r2: float
    models: tuple[str, ...]
    n_params: tuple[int, ...]
    last_mlp_gain: tuple[float, ...]

    def summary(self) -> str:
        rows = "\n".join(f"  {m:30} {p:>15,} {g:>8.3f}" for m, p, g in zip(self.models, self.n_params, self.last_mlp_gain))
        return (
            f"last MLP gain ~ params^{self.exponent:.3f} +- {self.exponent_se:.3f} (R^2 {self.r2:.3f}, "
            f"{len(self.models)} models; write-up: 0.35 from two)\n{rows}"
        )

    def figure(self):
        import plotly.graph_objects as go

        p = np.array(self.n_params, dtype=np.float64)
        grid = np.geomspace(p.min(), p.max(), 50)
        fig = go.Figure([
            go.Scatter(x=p, y=self.last_mlp_gain, mode="markers+text", text=list(self.models),
                       textposition="top center", name="models"),
            go.Scatter(x=grid, y=np.exp(self.intercept) * grid**self.exponent,
                       mode="lines",
                       name=f"fit: exponent {self.exponent:.3f} +- {self.exponent_se:.3f}"),
        ])
        fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="parameters", yaxis_title="last-block MLP gain",
                          template="plotly_white", title="Last MLP gain against model size")
        return fig


def scaling(results: list[GainsResult]) -> GainScaling:
    """Fit the last-block MLP gain against parameter count across at least three models.

    Two models always give an exponent (a line through two points), so fewer than three distinct
    parameter counts is refused; so are results measured under different definitions or mixing
    trained and untrained weights.
    """
    if len({r.provenance.n_params for r in results}) < 3:
        raise ArgumentError(
            f"gains.scaling needs at least 3 models of different sizes, got {len(results)} result(s) with "
            f"{len({r.provenance.n_params for r in results})} distinct parameter count(s): two points always give an exponent"
        )
    if any(r.provenance.n_params is None for r in results):
        raise ArgumentError("a result has no parameter count (provenance.n_params): measure it with this version of lensdyn")
    for field in ("reference", "tokens"):
        values = sorted({getattr(r, field) for r in results})
        if len(values) > 1:
            raise ArgumentError(f"results differ in {field}: {values}; compare like with like")
    if len({r.conventions.aggregation for r in results}) > 1 or len({r.provenance.weights for r in results}) != 1:
        raise ArgumentError("results differ in aggregation or in weights (trained vs untrained); compare like with like")
    params = np.array([r.provenance.n_params for r in results], dtype=np.float64)
    gain = np.array([r.last_mlp_gain for r in results])
    fit = line_fit(np.log(params), np.log(gain)[None, :])
    return GainScaling(
        exponent=float(fit.slope[0]),
        exponent_se=float(fit.slope_se[0]),
        intercept=float(fit.intercept[0]),
        r2=float(fit.r2[0]),
        models=tuple(r.provenance.model for r in results),
        n_params=tuple(int(p) for p in params),
        last_mlp_gain=tuple(float(g) for g in gain),
    )


@dataclass(frozen=True)
class GainsParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    reference: str = option("ln_output", "what a sublayer's output is compared to", choices=REFERENCES)
    aggregation: str = option("ratio_of_means", "how the gains aggregate over tokens", choices=AGGREGATIONS)
    tokens: str = option("all", "all included tokens or each prompt's last", choices=TOKENS)


ANALYSIS = Analysis(
    name="gains",
    help="attention / MLP / residual gain per block, with MLP phases",
    heading="Sublayer gains",
    order=30,
    cost=0.05,
    streams=STREAMS,
    result=GainsResult,
    measure=measure,
    parameters=GainsParameters,
)
