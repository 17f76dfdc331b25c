"""Massive activations: single coordinates of the residual state far above the rest of their vector.

Sun, Chen, Kolter and Liu 2024 ("Massive Activations in Large Language Models", arXiv:2402.17762)
find a few activations of magnitude above 100 and about 1,000 times the median magnitude of their
hidden state, on the first token and on the first delimiter tokens ("." or "\\n"), from an early
layer on, in a few fixed dimensions. The rule lensdyn applies is ``lensdyn.ops.massive_mask``:
coordinate ``i`` of state ``l`` of token ``t`` is massive when

    |x_{l,t,i}| > threshold  and  |x_{l,t,i}| >= ratio * median_j |x_{l,t,j}|

(``threshold = 100``, ``ratio = 1000`` by default; the median over the ``d_model`` coordinates of the
same vector, the mean of the two middle values for an even ``d_model``). Both bounds are hard:
nothing here lowers them to make something appear.

The census reads every real token, position 0 and tokens the capture's ``exclude`` leaves out
included (those are what it looks for); each carrier says whether the capture's ``mask`` kept it.
Per state: how many coordinates are massive and on how many tokens, and the largest ``|x|`` with its
ratio to its vector's median, its dimension and token, whether or not it passes the rule. Per
``(token, dimension)`` that is massive at some state: the first such state, how many states, the
largest magnitude. The untrained control is measured beside it on the same prompts
(``control_capture``: under the ``"massive"`` exclusion rule, on the model's tokens).

>>> result = massive.measure(ld.load_model("smollm2-135m"), "diverse")     # doctest: +SKIP
>>> print(result.summary())                                               # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn import citations, plots
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.hooks.capture import Capture
from lensdyn.ops import MASSIVE_RATIO, MASSIVE_THRESHOLD, massive_mask, median_magnitude, to_numpy
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.resampling import prompt_counts
from lensdyn.verdicts import Claim

STREAMS = ("resid",)
FEW_DIMENSIONS = 0.01  # "very few fixed dimensions", as a share of d_model (the claim's rule)
LISTED = 20  # carriers the summary lists


# --- pure functions of tensors -------------------------------------------------------------


def massive_entries(
    states: Float[Tensor, "state token d_model"], threshold: float = MASSIVE_THRESHOLD, ratio: float = MASSIVE_RATIO
) -> Int[Tensor, "entry 3"]:
    """``(state, token, dim)`` of every massive coordinate (``lensdyn.ops.massive_mask``), in that order.

    >>> x = torch.ones(3, 2, 8)
    >>> x[1:, 0, 3] = 5000.                 # token 0, dim 3: massive from state 1 on
    >>> massive_entries(x).tolist()
    [[1, 0, 3], [2, 0, 3]]
    """
    return massive_mask(states, threshold, ratio).nonzero()


def carriers_of(entries: Int[Tensor, "entry 3"]) -> Int[Tensor, "carrier 4"]:
    """``(token, dim, first state, number of states)`` of every ``(token, dim)`` among ``entries``
    (``(state, token, dim)`` rows), sorted by token then dim: ``first = min_l`` over its entries.

    >>> carriers_of(torch.tensor([[2, 5, 1], [1, 5, 1], [3, 0, 7], [3, 5, 1]])).tolist()
    [[0, 7, 3, 1], [5, 1, 1, 3]]
    """
    pairs, inverse, counts = torch.unique(entries[:, 1:], dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(pairs),), torch.iinfo(entries.dtype).max, dtype=entries.dtype)
    first = first.scatter_reduce(0, inverse, entries[:, 0], reduce="amin")
    return torch.cat([pairs, first[:, None], counts[:, None]], dim=1)


def top_activations(
    states: Float[Tensor, "state token d_model"],
) -> tuple[Float[Tensor, " state"], Float[Tensor, " state"], Int[Tensor, " state"], Int[Tensor, " state"]]:
    """Per state the largest ``|x_{l,t,i}|`` over tokens and dims, its ratio to ``median_j |x_{l,t,j}|``,
    and its ``token`` and ``dim``: ``(magnitude, ratio, token, dim)``, magnitude and ratio in float64.

    >>> x = torch.ones(1, 2, 4)
    >>> x[0, 1, 2] = -40.
    >>> [v.tolist() for v in top_activations(x)]
    [[40.0], [40.0], [1], [2]]
    """
    magnitude, dim = states.abs().max(dim=-1)  # [state, token]
    token = magnitude.argmax(dim=-1)
    states_index = torch.arange(states.shape[0])
    top_dim = dim[states_index, token]
    median = median_magnitude(states[states_index, token])
    top = magnitude[states_index, token].to(torch.float64)
    return top, top / median, token, top_dim


def is_delimiter(token: str) -> bool:
    """A delimiter token: its text, stripped of whitespace, is empty (a newline, a space) or only punctuation.

    >>> [is_delimiter(t) for t in (".", "\\n", " ,", "The", "3.")]
    [True, True, True, False, False]
    """
    text = token.strip()
    return all(not c.isalnum() for c in text)


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Carrier:
    """One ``(token, dimension)`` whose coordinate is massive at some state."""

    prompt: int
    position: int
    token: str
    dim: int
    first_state: int  # the first state at which it is massive
    n_states: int  # states at which it is massive
    magnitude: float  # its largest |x| at those states
    ratio: float  # that |x| over the median |x| of its vector
    excluded: bool  # the capture's mask leaves this position out (exclude rules)


@dataclass(frozen=True, eq=False)
class MassiveResult(Result):
    """The census of one model; arrays index states ``0..n_layers``. ``control``: the untrained model's."""

    threshold: float
    ratio: float
    d_model: int
    count: Int[np.ndarray, " state"]  # massive coordinates at each state
    carrier_tokens: Int[np.ndarray, " state"]  # tokens holding at least one
    top_magnitude: Float[np.ndarray, " state"]  # largest |x| over every real token and dim
    top_ratio: Float[np.ndarray, " state"]  # that coordinate's |x| over its vector's median
    top_dim: Int[np.ndarray, " state"]
    top_prompt: Int[np.ndarray, " state"]
    top_position: Int[np.ndarray, " state"]
    top_token: tuple[str, ...]
    carriers: tuple[Carrier, ...]
    prompt_labels: tuple[str, ...]
    control: "MassiveResult | None" = None
    count_by_prompt: Int[np.ndarray, "prompt state"] | None = None  # ``count`` per prompt, for the bootstrap

    def resample(self, rng: np.random.Generator) -> "MassiveResult | None":
        """The census on prompts drawn with replacement: their counts and carriers as found (None without
        ``count_by_prompt``, as in a result read back from JSON)."""
        if self.count_by_prompt is None:
            return None
        counts = prompt_counts(rng, len(self.prompt_labels))
        return dataclasses.replace(self, count=counts @ self.count_by_prompt, count_by_prompt=None,
                                   carriers=tuple(c for c in self.carriers for _ in range(counts[c.prompt])))

    @property
    def n_layers(self) -> int:
        return len(self.count) - 1

    @property
    def dims(self) -> tuple[int, ...]:
        """The dimensions that carry massive activations, most carriers first."""
        dims = [c.dim for c in self.carriers]
        return tuple(sorted(set(dims), key=lambda d: (-dims.count(d), d)))

    @property
    def states_with(self) -> tuple[int, ...]:
        """The states holding at least one massive activation."""
        return tuple(int(l) for l in np.flatnonzero(self.count))

    def summary(self) -> str:
        p, c = self.provenance, self.control
        peak = int(np.argmax(self.top_magnitude))
        lines = [
            f"Massive activations: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, every real "
            f"token; rule |x| > {self.threshold:g} and >= {self.ratio:g} x the median |x| of its vector",
            f"found {int(self.count.sum())} massive coordinates on {len({(k.prompt, k.position) for k in self.carriers})} "
            f"tokens, in dims {list(self.dims)}; largest |x| {self.top_magnitude[peak]:.1f} at state {peak} "
            f"(dim {self.top_dim[peak]}, {self.top_ratio[peak]:.0f}x its median, token {self.top_token[peak]!r})"
            + (f"; control: {int(c.count.sum())}, largest |x| {c.top_magnitude.max():.1f}" if c is not None else ""),
            f"{'state':>5} {'count':>6} {'tokens':>6} {'top |x|':>10} {'ratio':>8} {'dim':>5} {'prompt:pos':>10}  token"
            + (f" {'control |x|':>12} {'ratio':>8}" if c is not None else ""),
        ]
        for l in range(len(self.count)):
            row = (f"{l:>5} {self.count[l]:>6} {self.carrier_tokens[l]:>6} {self.top_magnitude[l]:>10.1f} "
                   f"{self.top_ratio[l]:>8.0f} {self.top_dim[l]:>5} {f'{self.top_prompt[l]}:{self.top_position[l]}':>10}  "
                   f"{self.top_token[l]!r:<12}")
            if c is not None:
                row += f" {c.top_magnitude[l]:>12.1f} {c.top_ratio[l]:>8.0f}"
            lines.append(row.rstrip())
        for k in self.carriers[:LISTED]:
            lines.append(f"carrier {self.prompt_labels[k.prompt]}:{k.position} {k.token!r} dim {k.dim}: from state "
                         f"{k.first_state}, {k.n_states} states, max |x| {k.magnitude:.1f} ({k.ratio:.0f}x)"
                         + (" [excluded]" if k.excluded else ""))
        if len(self.carriers) > LISTED:
            lines.append(f"... and {len(self.carriers) - LISTED} more carriers")
        return "\n".join(lines)

    def figure(self):
        """Largest |x| per state (top) and its ratio to its vector's median (bottom), log scales, the rule's
        bounds dashed, each point labelled by its dimension; the control in grey."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                            subplot_titles=("largest |x| of a coordinate", "its ratio to its vector's median |x|"))
        for r, colour in ((self, plots.MODEL_2), (self.control, plots.CONTROL)):
            if r is None:
                continue
            label = f"{r.provenance.model} ({r.provenance.weights})"
            states = np.arange(len(r.count))
            hover = [f"state {l}: dim {r.top_dim[l]}, {r.top_token[l]!r} ({r.top_prompt[l]}:{r.top_position[l]}), "
                     f"{r.count[l]} massive" for l in states]
            for row, values in ((1, r.top_magnitude), (2, r.top_ratio)):
                fig.add_trace(go.Scatter(
                    x=states, y=values, mode="lines+markers+text", text=[f"d{d}" for d in r.top_dim],
                    textposition="top center", textfont={"size": 8, "color": colour}, line={"color": colour},
                    name=label, legendgroup=label, showlegend=row == 1, hovertext=hover, hoverinfo="text+y",
                ), row=row, col=1)
        fig.add_hline(y=self.threshold, line={"color": "black", "dash": "dash", "width": 1}, row=1, col=1)
        fig.add_hline(y=self.ratio, line={"color": "black", "dash": "dash", "width": 1}, row=2, col=1)
        runs = [r for r in (self, self.control) if r is not None]
        fig.update_yaxes(type="log", title_text="|x| (raw units)", row=1, col=1,
                         **plots.log_ticks([r.top_magnitude for r in runs] + [self.threshold]))
        fig.update_yaxes(type="log", title_text="|x| / median |x| (ratio)", row=2, col=1,
                         **plots.log_ticks([r.top_ratio for r in runs] + [self.ratio]))
        plots.shrink_subplot_titles(fig)
        fig.update_xaxes(title_text="state l (input of block l; last = final block output before the final norm)",
                         row=2, col=1)
        fig.update_layout(title=f"Massive activations (|x| > {self.threshold:g} and >= {self.ratio:g}x the median; "
                          f"{int(self.count.sum())} found, dims {list(self.dims)[:6]})",
                          template="plotly_white", height=620)
        return fig


SUN = citations.SUN.source


def _run_starts_early(r: MassiveResult) -> tuple[str, bool | None]:
    states = r.states_with
    if not states:
        return "none found", None
    one_run = states == tuple(range(states[0], states[-1] + 1))
    return (f"states {states[0]}-{states[-1]}{'' if one_run else ' with gaps'} of 0-{r.n_layers}",
            one_run and states[0] <= r.n_layers / 2)


CLAIMS = (
    Claim(SUN, "massive activations exist", "some |x| > 100 and >= 1000x the median |x| of its vector, at some state",
          lambda r: (f"{int(r.count.sum())} (top |x| {r.top_magnitude.max():.0f}, "
                     f"{r.top_ratio[int(np.argmax(r.top_magnitude))]:.0f}x)", bool(r.count.sum() > 0)),
          units="activations counted; |x| in the residual stream's raw units; x: times the vector's median |x|"),
    Claim(SUN, "they sit on the first token and on delimiters",
          "every carrier is at position 0 or a delimiter (whitespace or punctuation only)",
          lambda r: (f"{sum(k.position == 0 or is_delimiter(k.token) for k in r.carriers)}/{len(r.carriers)} carriers",
                     all(k.position == 0 or is_delimiter(k.token) for k in r.carriers) if r.carriers else None)),
    Claim(SUN, "they stay in very few fixed dimensions", f"at most {FEW_DIMENSIONS:.0%} of d_model's dimensions carry them",
          lambda r: (f"{len(r.dims)} dims {list(r.dims)[:4]}",
                     len(r.dims) <= FEW_DIMENSIONS * r.d_model if r.carriers else None)),
    Claim(SUN, "they appear at an early layer and stay",
          "the states holding them are one run, starting in the first half of the states", _run_starts_early),
)
MassiveResult.claims = CLAIMS


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    threshold: float = MASSIVE_THRESHOLD,
    ratio: float = MASSIVE_RATIO,
    **capture_kwargs,
) -> MassiveResult:
    """The census of a model (captured here) or of a ``Capture`` holding ``resid``, with the untrained
    control (``control="random"``; a ``Capture`` then needs ``model=``), a ``MassiveResult`` as is, or None."""

    def measure_one(cap: Capture, model) -> MassiveResult:
        return census(cap, threshold, ratio)

    return measure_with_control("massive", capture_or_model, prompts, STREAMS, measure_one, model=model,
                                control=control, **capture_kwargs)


def census(cap: Capture, threshold: float = MASSIVE_THRESHOLD, ratio: float = MASSIVE_RATIO) -> MassiveResult:
    """The census of one capture (module docstring), every real token read."""
    cap.require_streams(STREAMS)
    states = cap.packed["resid"]  # [state, token, d_model], every real token
    entries = massive_entries(states, threshold, ratio).cpu()  # a few index rows: the bookkeeping runs on the host
    per_state = torch.zeros(len(states), dtype=torch.long).index_add_(0, entries[:, 0], torch.ones_like(entries[:, 0]))
    state_token = torch.unique(entries[:, :2], dim=0)
    tokens_per_state = torch.zeros(len(states), dtype=torch.long).index_add_(
        0, state_token[:, 0], torch.ones_like(state_token[:, 0]))
    where = cap.token_mask.nonzero()  # packed token -> (prompt, position)
    by_prompt = torch.zeros(cap.n_prompts, len(states), dtype=torch.long)
    by_prompt.index_put_((where[entries[:, 1], 0], entries[:, 0]), torch.ones_like(entries[:, 0]), accumulate=True)
    kept = cap.mask[cap.token_mask]
    carriers = []
    for token, dim, first, n_states in carriers_of(entries).tolist():
        values = states[:, token, dim].abs()
        peak = int(torch.where(massive_mask(states[:, token])[:, dim], values, 0).argmax())
        prompt, position = where[token].tolist()
        carriers.append(Carrier(
            prompt=prompt, position=position, token=cap.str_tokens[prompt][position], dim=dim, first_state=first,
            n_states=n_states, magnitude=float(values[peak]),
            ratio=float(values[peak] / median_magnitude(states[peak, token])), excluded=not bool(kept[token]),
        ))
    top, top_ratio, top_token, top_dim = (t.cpu() for t in top_activations(states))
    top_where = where[top_token]
    return MassiveResult(
        conventions=Conventions(
            aggregation="census over every real token (exclusions not applied; each carrier says if excluded); "
            f"massive: |x| > {threshold:g} and >= {ratio:g} x its vector's median |x|",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        threshold=float(threshold),
        ratio=float(ratio),
        d_model=int(states.shape[-1]),
        count=to_numpy(per_state),
        carrier_tokens=to_numpy(tokens_per_state),
        top_magnitude=to_numpy(top),
        top_ratio=to_numpy(top_ratio),
        top_dim=to_numpy(top_dim),
        top_prompt=to_numpy(top_where[:, 0]),
        top_position=to_numpy(top_where[:, 1]),
        top_token=tuple(cap.str_tokens[p][q] for p, q in top_where.tolist()),
        carriers=tuple(carriers),
        prompt_labels=cap.prompts.labels,
        count_by_prompt=to_numpy(by_prompt),
    )


@dataclass(frozen=True)
class MassiveParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    threshold: float = option(MASSIVE_THRESHOLD, "least |x| of a massive activation (the census; the 'massive' "
                              "exclusion rule keeps the paper's 100)", flag="--massive-threshold", positive=True)
    ratio: float = option(MASSIVE_RATIO, "least ratio of |x| to its vector's median |x| (the census; the 'massive' "
                          "exclusion rule keeps the paper's 1000)", flag="--massive-ratio", positive=True)


ANALYSIS = Analysis(
    name="massive",
    help="massive activations (Sun et al. 2024): which tokens, dims and states carry |x| > 100 and 1000x the median",
    heading="Massive activations",
    order=15,
    cost=0.03,
    streams=STREAMS,
    result=MassiveResult,
    measure=measure,
    parameters=MassiveParameters,
)
