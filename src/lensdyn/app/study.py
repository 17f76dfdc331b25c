"""Across models: ``lensdyn study --models A B C --prompts P --out DIR``, one table of claims x models.

    columns = [measure_model(name, prompts, chosen, options, check) for name in models]   # one at a time
    rows = verdict_matrix(columns, names)            # one row per claim, one cell per model
    cross = cross_model_verdicts(columns)           # claims that only several models can test

Each model is measured as ``lensdyn report`` measures it (``lensdyn.app.run``: the model and its
untrained controls on one prompt set, every chosen analysis, the claims judged as one family),
then freed before the next: one model and its controls in memory at a time. An analysis that
needs a causal language model (``registry.Analysis.causal``) is not run on an encoder; its
claims' cells say so.

Three claims need several models; each is a ``lensdyn.verdicts.Claim`` whose "result" is the
list of columns, judged with ``verdicts.judge`` (no p-value, no bootstrap: the models are the
sample):

1. FLRW prediction 4, "H(L) is model-invariant" (``compare_hubble``). Models of different depth
   are compared on relative depth: block ``l`` of ``n`` sits at ``x = (l + 1/2) / n`` and its
   rate per unit relative depth is ``n H(l)`` (``d log a / dx``), so two models whose scale
   factor grows alike over their depth have the same curve whatever their block count. The
   curves are interpolated linearly to ``GRID`` points of the depth range every model covers.
   Rule, on both tracks (causal and Euclidean) and every pair of models: Pearson ``r >= 0.8``
   (the same shape: ``r^2 = 0.64``, two thirds of one curve's variation shared with the other,
   the usual floor of a "strong" correlation) and the larger mean rate at most ``2x`` the
   smaller, with the same sign (the same overall expansion: "similar curves" cannot mean one
   model expanding twice as much). Both were fixed before any model was measured.
2. Pythia, "last-MLP gain scales with model size" (``gains.scaling``): a power-law exponent over
   at least 3 distinct parameter counts (two points always give one). Rule: exponent > 0 with
   its 95% t interval (``n - 2`` degrees of freedom) excluding 0; the write-up's is 0.35.
3. statelens, "temperature response depends on attention type (MHA C ~ 27, GQA ~ 4, MQA ~ 0)":
   ``C`` of ``tau = tau_min + C / beta`` from stability's temperature sweep alone (no Jacobian:
   ``layers=()``; one extra forward pass per temperature). Only fits with ``R^2 >= 0.5`` count
   (stability's own floor for a usable fit). Rule: with at least two attention types measured,
   every pair of types ranks as the write-up's, MHA > GQA > MQA by mean ``C``. The models also
   differ in size, data and (an encoder) attention direction: the rule cannot separate those.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from scipy.optimize import OptimizeWarning

from lensdyn.analyses import gains, registry, stability
from lensdyn.app import run
from lensdyn.errors import ArgumentError, UnsupportedArchitectureError
from lensdyn.verdicts import NOT_TESTABLE, Claim, Verdict, finite, judge

GRID = 50  # points of the common relative-depth grid
MIN_PEARSON, MAX_RATIO = 0.8, 2.0  # claim 1's rule (module docstring)
MIN_TAU_R2 = 0.5  # claim 3: the fits that count
WRITE_UP_ORDER = ("MHA", "GQA", "MQA")  # claim 3: the write-up's C, largest first
TRACKS = ("causal_inverse", "euclidean")  # the write-up's causal metric, and the plain norm
NOT_CAUSAL = "not run: not a causal LM"


@dataclass(frozen=True)
class StudyOptions:
    """How each model is measured: ``lensdyn report``'s options."""

    exclude: tuple[str, ...] = ("first",)
    batch_size: int = 8
    truncate: bool = False
    seed: int = 0
    control: str = "random"
    control_seeds: tuple[int, ...] = run.CONTROL_SEEDS
    n_bootstrap: int = 200
    device: str | None = None
    side_by_side: bool = True
    temperature: bool = True  # claim 3's sweep (its own forward passes)


@dataclass
class Column:
    """One model of a study: its provenance, its verdicts per claim, and what the cross-model claims read."""

    model: str
    provenance: dict[str, object]  # n_params, n_layers, d_model, layout, attention_type, attention_dir
    cells: dict[tuple[str, int], Verdict]  # (analysis, claim index) -> verdict
    skipped: dict[str, str]  # analysis -> why it was not run
    expansion: object | None = None  # ExpansionResult, its first control attached
    gains: object | None = None  # GainsResult
    temperature: object | None = None  # StabilityResult of the temperature sweep alone
    temperature_note: str = ""  # why there is none
    timings: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


def split_causal(chosen: Sequence[tuple[object, object]], model) -> tuple[list, dict[str, str]]:
    """The chosen ``(analysis, parameters)`` this model can run, and the others with why not (an encoder
    cannot run an analysis that needs a causal LM)."""
    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    runnable = [(a, p) for a, p in chosen if causal or not a.causal]
    skipped = {a.name: f"{NOT_CAUSAL} ({a.causal})" for a, _ in chosen if a.causal and not causal}
    return runnable, skipped


def measure_model(name: str, prompts, chosen: Sequence[tuple[object, object]], options: StudyOptions,
                  check: Callable[[object, list], None] = lambda model, chosen: None,
                  on_step: Callable[[str, str], None] | None = None) -> Column:
    """Load ``name`` and its controls, measure the chosen analyses (``run.measure_prompt_set``), judge them
    (``run.judge_measured``), run the temperature sweep, then free the models.

    ``check(model, runnable)``: what the command line checks once a model has loaded (before any forward pass).
    """
    from lensdyn.hooks.temperature import attention_type
    from lensdyn.models import load_model, model_info

    runs = run.reference_runs(name, "pretrained", control=options.control, compare=None,
                              control_seeds=options.control_seeds)
    models = {}
    for r in runs:  # one after the other: random weights are drawn from the global RNG
        models[r.role] = load_model(r.model, weights=r.weights, seed=r.seed, device=options.device)
    model = models["model"]
    runnable, skipped = split_causal(chosen, model)
    for m in models.values():
        check(m, runnable)
    info = model_info(model)
    provenance = {"n_params": info.n_params, "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                  "layout": info.layout, "attention_type": attention_type(model),
                  "attention_dir": getattr(model.cfg, "attention_dir", "causal")}
    column = Column(name, provenance, {}, skipped)
    if runnable:
        measured = run.measure_prompt_set(runs, models, prompts, runnable, exclude=options.exclude,
                                          batch_size=options.batch_size, truncate=options.truncate, seed=options.seed,
                                          side_by_side=options.side_by_side, on_step=on_step)
        names = [a.name for a, _ in runnable]
        verdicts = iter(run.judge_measured(measured, names, n_bootstrap=options.n_bootstrap, seed=options.seed))
        for analysis in names:  # judge's order: each result's claims in turn
            for i, _ in enumerate(registry.get(analysis).result.claims):
                column.cells[(analysis, i)] = next(verdicts)
        column.expansion = measured.results.get("expansion")
        column.gains = measured.results.get("gains")
        column.timings = measured.timings
    if options.temperature:
        began = time.perf_counter()
        try:
            with warnings.catch_warnings():  # the sweep's K-theta law on three K: unused here, and its fit warns
                warnings.simplefilter("ignore", OptimizeWarning)
                column.temperature = stability.measure(model, prompts, control=None, layers=(), k_grid=(1, 2, 4),
                                                       seed=options.seed, exclude=options.exclude,
                                                       batch_size=options.batch_size, truncate=options.truncate)
        except UnsupportedArchitectureError as err:
            column.temperature_note = f"no temperature sweep: {err}"
        column.timings.setdefault("model", {})["temperature_s"] = round(time.perf_counter() - began, 3)
    else:
        column.temperature_note = "no temperature sweep (--no-temperature)"
    models.clear()
    del model
    gc.collect()  # this model's tensors go before the next one loads
    return column


# --- the matrix ------------------------------------------------------------------------------


def claim_rows(names: Sequence[str]) -> list[tuple[str, int, Claim]]:
    """``(analysis, index, claim)`` of every claim of the analyses ``names``, in their order."""
    return [(name, i, claim) for name in names for i, claim in enumerate(registry.get(name).result.claims)]


def verdict_matrix(columns: Sequence[Column], names: Sequence[str]) -> list[dict[str, object]]:
    """One row per claim of the analyses ``names``, one cell per model: verdict, robustness, measured
    value, the control spread; a model that did not run the analysis says why."""
    rows = []
    for analysis, i, claim in claim_rows(names):
        cells = {}
        for c in columns:
            v = c.cells.get((analysis, i))
            if v is None:
                why = c.skipped.get(analysis, "not run")
                cells[c.model] = {"verdict": why, "robustness": "", "measured": "", "reference": "", "rule": claim.rule}
            else:
                cells[c.model] = {"verdict": v.verdict, "robustness": v.robustness, "bootstrap_share": v.bootstrap_share,
                                  "measured": v.measured, "reference": v.reference, "rule": v.rule, "note": v.note}
        rows.append({"analysis": analysis, "source": claim.source, "claim": claim.claim, "rule": claim.rule,
                     "cells": cells})
    return rows


def matrix_text(rows: Sequence[dict[str, object]], models: Sequence[str]) -> str:
    """The matrix as fixed-width text: per cell its verdict, robustness and measured value.

    >>> cell = {"verdict": "holds", "robustness": "robust", "measured": "1.2"}
    >>> print(matrix_text([{"claim": "c", "cells": {"m": cell}}], ["m"]))
    claim  m
    c      holds (robust): 1.2
    """
    def text(cell: dict) -> str:
        if not cell["measured"]:
            return cell["verdict"]
        return f"{cell['verdict']} ({cell['robustness']}): {cell['measured']}"

    table = [("claim", *models)] + [(r["claim"], *(text(r["cells"][m]) for m in models)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


# --- claim 1: H(l) on relative depth ---------------------------------------------------------


def relative_rate(hubble: Float[np.ndarray, " block"]) -> tuple[Float[np.ndarray, " block"], Float[np.ndarray, " block"]]:
    """Block midpoints on relative depth, ``x_l = (l + 1/2) / n``, and the rate per unit of it, ``n H(l)``.

    >>> [v.tolist() for v in relative_rate(np.array([0.1, 0.3]))]
    [[0.25, 0.75], [0.2, 0.6]]
    """
    n = len(hubble)
    return (np.arange(n) + 0.5) / n, n * np.asarray(hubble, dtype=np.float64)


@dataclass(frozen=True)
class HubbleComparison:
    """Every model's rate ``n H`` on the common grid, and each pair's Pearson r and ratio of mean rates."""

    models: tuple[str, ...]
    grid: Float[np.ndarray, " grid"]
    rates: Float[np.ndarray, "model grid"]
    pairs: tuple[tuple[str, str, float, float], ...]  # (a, b, pearson, larger / smaller mean; inf: opposite signs)

    def holds(self) -> bool | None:
        """Claim 1's rule on every pair (None: a correlation is undefined, a flat curve)."""
        if not all(math.isfinite(r) for _, _, r, _ in self.pairs):
            return None
        return all(r >= MIN_PEARSON and ratio <= MAX_RATIO for _, _, r, ratio in self.pairs)

    def describe(self) -> str:
        return "; ".join(f"{a} vs {b}: r {r:.2f}, ratio {ratio:.2f}" for a, b, r, ratio in self.pairs)


def mean_ratio(a: float, b: float) -> float:
    """``max(|a|, |b|) / min(|a|, |b|)`` of two mean rates; ``inf`` when their signs differ or one is 0.

    >>> mean_ratio(0.5, 2.0), mean_ratio(-1.0, 1.0)
    (4.0, inf)
    """
    if a * b <= 0:
        return math.inf
    return max(abs(a), abs(b)) / min(abs(a), abs(b))


def compare_hubble(curves: dict[str, Float[np.ndarray, " block"]], size: int = GRID) -> HubbleComparison:
    """Each model's ``H(l)`` as ``n H`` on relative depth (``relative_rate``), linearly interpolated to ``size``
    points of the range every model's block midpoints cover, and each pair's Pearson r and ``mean_ratio``.

    >>> c = compare_hubble({"a": np.array([0.125, 0.375]), "b": np.array([0.3125, 0.4375, 0.5625, 0.6875])})
    >>> [(a, b, round(r, 6), round(q, 6)) for a, b, r, q in c.pairs]    # a: x, b: 2x + 1 on [0.25, 0.75]
    [('a', 'b', 1.0, 4.0)]
    """
    if len(curves) < 2:
        raise ArgumentError(f"comparing H(l) needs at least 2 models, got {len(curves)}")
    depths = [len(h) for h in curves.values()]
    grid = np.linspace(max(0.5 / n for n in depths), min(1 - 0.5 / n for n in depths), size)
    rates = np.stack([np.interp(grid, *relative_rate(h)) for h in curves.values()])
    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(curves), 2):
        flat = np.ptp(rates[i]) == 0 or np.ptp(rates[j]) == 0
        r = float("nan") if flat else float(np.corrcoef(rates[i], rates[j])[0, 1])
        pairs.append((a, b, r, mean_ratio(float(rates[i].mean()), float(rates[j].mean()))))
    return HubbleComparison(tuple(curves), grid, rates, tuple(pairs))


def hubble_comparisons(columns: Sequence[Column]) -> dict[str, HubbleComparison | str]:
    """Per track, the comparison of the models that measured expansion, or why there is none."""
    measured = [c for c in columns if c.expansion is not None]
    if len(measured) < 2:
        why = f"{len(measured)} model(s) measured expansion: comparing H(l) needs at least 2"
        return {track: why for track in TRACKS}
    return {track: compare_hubble({c.model: c.expansion.track(track).hubble for c in measured}) for track in TRACKS}


def _hubble_test(columns: Sequence[Column]) -> tuple[str, bool | None]:
    found = hubble_comparisons(columns)
    if any(isinstance(v, str) for v in found.values()):
        return next(iter(found.values())), None
    holds = [found[t].holds() for t in TRACKS]
    measured = " | ".join(f"{t}: {found[t].describe()}" for t in TRACKS)
    return measured, None if None in holds else all(holds)


# --- claim 2: last-MLP gain against size ----------------------------------------------------


def gain_scaling(columns: Sequence[Column]) -> gains.GainScaling | str:
    """``gains.scaling`` over the models' gains results, or why it cannot be fitted."""
    results = [c.gains for c in columns if c.gains is not None]
    try:
        return gains.scaling(results)
    except ArgumentError as err:
        return str(err)


def exponent_interval(fit: gains.GainScaling, level: float = 0.95) -> tuple[float, float]:
    """The exponent's two-sided ``level`` t interval, ``n - 2`` degrees of freedom (``n``: models).

    >>> fit = gains.GainScaling(0.35, 0.1, 0.0, 0.9, ("a", "b", "c", "d"), (1, 2, 3, 4), (1.0, 1.0, 1.0, 1.0))
    >>> [round(v, 3) for v in exponent_interval(fit)]        # t(0.975, 2) = 4.303
    [-0.08, 0.78]
    """
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(fit.models) - 2)) * fit.exponent_se
    return fit.exponent - half, fit.exponent + half


def _scaling_test(columns: Sequence[Column]) -> tuple[str, bool | None]:
    fit = gain_scaling(columns)
    if isinstance(fit, str):
        return fit, None
    low, high = exponent_interval(fit)
    measured = (f"exponent {fit.exponent:.3f} +- {fit.exponent_se:.3f} (95% [{low:.3f}, {high:.3f}]), "
                f"R^2 {fit.r2:.2f}, {len(fit.models)} models")
    return measured, finite(fit.exponent > 0 and low > 0, fit.exponent, low)


# --- claim 3: temperature response by attention type ----------------------------------------


def temperature_by_type(columns: Sequence[Column]) -> dict[str, list[tuple[str, float]]]:
    """Attention type -> ``(model, C)`` of every temperature fit with ``R^2 >= MIN_TAU_R2``."""
    found: dict[str, list[tuple[str, float]]] = {}
    for c in columns:
        t = c.temperature
        if t is not None and np.isfinite(t.tau_c) and np.isfinite(t.tau_r2) and t.tau_r2 >= MIN_TAU_R2:
            found.setdefault(t.attention_type, []).append((c.model, float(t.tau_c)))
    return found


def ranks_as_write_up(mean_c: dict[str, float]) -> bool:
    """Every pair of attention types present ordered by mean C as the write-up's MHA > GQA > MQA.

    >>> ranks_as_write_up({"MHA": 27.0, "GQA": 4.0}), ranks_as_write_up({"MQA": 2.0, "GQA": 1.0})
    (True, False)
    """
    present = [t for t in WRITE_UP_ORDER if t in mean_c]
    return all(mean_c[a] > mean_c[b] for a, b in itertools.combinations(present, 2))


def _temperature_test(columns: Sequence[Column]) -> tuple[str, bool | None]:
    found = temperature_by_type(columns)
    mean_c = {t: float(np.mean([c for _, c in v])) for t, v in found.items()}
    measured = ", ".join(f"{t} C {mean_c[t]:.2f} ({len(found[t])} model(s))" for t in WRITE_UP_ORDER if t in mean_c)
    if len(found) < 2:
        each = "; ".join(f"{c.model} {c.temperature.attention_type}: C {c.temperature.tau_c:.2f}, R^2 {c.temperature.tau_r2:.2f}"
                         if c.temperature is not None else f"{c.model}: {c.temperature_note}" for c in columns)
        return (f"{len(found)} attention type(s) with a usable fit (R^2 >= {MIN_TAU_R2}), the comparison needs 2 "
                f"({each})"), None
    return measured, ranks_as_write_up(mean_c)


CROSS_CLAIMS = (
    Claim("FLRW write-up, prediction 4", "H(L) is model-invariant",
          f"every pair of models, causal and Euclidean tracks: Pearson r >= {MIN_PEARSON} of n H(l) on relative depth "
          f"(interpolated to {GRID} shared points) and larger / smaller mean rate <= {MAX_RATIO:g}, same sign",
          _hubble_test),
    Claim("Pythia write-up", "last-MLP gain scales with model size (exponent 0.35)",
          "gains.scaling over >= 3 distinct sizes: exponent > 0 with its 95% t interval excluding 0", _scaling_test),
    Claim("expansion-system study (statelens)", "temperature response depends on attention type (MHA C ~ 27, GQA ~ 4, "
          "MQA ~ 0)", f"mean C of the fits with R^2 >= {MIN_TAU_R2} per attention type ranks MHA > GQA > MQA over the "
          "types present (>= 2)", _temperature_test),
)


def cross_model_verdicts(columns: Sequence[Column]) -> list[Verdict]:
    """The cross-model claims judged on the columns (module docstring); a claim not testable says why."""
    verdicts = judge([list(columns)], claims=[CROSS_CLAIMS], n_bootstrap=0)
    return [dataclasses.replace(v, note=v.measured) if v.verdict == NOT_TESTABLE else v for v in verdicts]


# --- figures and files -----------------------------------------------------------------------


def hubble_figure(columns: Sequence[Column]):
    """``n H(l)`` against relative depth, every model that measured expansion (causal solid, Euclidean dotted)
    and its first untrained control in grey."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    fig = go.Figure()
    colours = itertools.cycle(qualitative.Plotly)
    for c in columns:
        if c.expansion is None:
            continue
        colour = next(colours)
        for track, dash in (("causal_inverse", "solid"), ("euclidean", "dot")):
            x, y = relative_rate(c.expansion.track(track).hubble)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=f"{c.model} ({track})",
                                     line={"color": colour, "dash": dash}))
            if c.expansion.control is not None:
                x, y = relative_rate(c.expansion.control.track(track).hubble)
                fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{c.model} control ({track})",
                                         line={"color": "grey", "dash": dash}, opacity=0.6))
    fig.update_layout(template="plotly_white", title="H(l) on relative depth: n H(l) at (l + 1/2) / n",
                      xaxis_title="relative depth", yaxis_title="d log a / d(relative depth)")
    return fig


def gain_figure(columns: Sequence[Column]):
    """Last-MLP gain against parameter count (log-log), with ``gains.scaling``'s fit where there is one;
    None with fewer than 2 models."""
    import plotly.graph_objects as go

    measured = [c for c in columns if c.gains is not None]
    if len(measured) < 2:
        return None
    fit = gain_scaling(columns)
    if not isinstance(fit, str):
        return fit.figure()
    fig = go.Figure(go.Scatter(x=[c.provenance["n_params"] for c in measured], y=[c.gains.last_mlp_gain for c in measured],
                               mode="markers+text", text=[c.model for c in measured], textposition="top center"))
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="parameters", yaxis_title="last-block MLP gain",
                      template="plotly_white", title=f"Last MLP gain against model size (no fit: {fit})")
    return fig


def _json_safe(value):
    """NaN and infinity as None, tuples as lists, arrays as lists: strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def study_index(columns: Sequence[Column], names: Sequence[str], rows, cross: Sequence[Verdict], **about) -> dict:
    """What ``study.json`` holds: per model its provenance and verdicts, the matrix, the cross-model claims
    and their numbers (pairwise H(l) comparisons, the scaling fit, C per attention type)."""
    hubble = {track: v if isinstance(v, str) else {"grid": v.grid, "rates": dict(zip(v.models, v.rates)),
                                                    "pairs": [dict(zip(("a", "b", "pearson", "mean_ratio"), p)) for p in v.pairs]}
              for track, v in hubble_comparisons(columns).items()}
    fit = gain_scaling(columns)
    temperature = {c.model: ({"attention_type": c.temperature.attention_type, "tau_c": c.temperature.tau_c,
                              "tau_min": c.temperature.tau_min, "tau_r2": c.temperature.tau_r2,
                              "betas": c.temperature.betas, "tau": c.temperature.tau}
                             if c.temperature is not None else c.temperature_note) for c in columns}
    models = {c.model: {"provenance": c.provenance, "skipped": c.skipped, "timings_s": c.timings,
                        "verdicts": [{"analysis": a, **dataclasses.asdict(v)} for (a, _), v in c.cells.items()]}
              for c in columns}
    return _json_safe({
        **about, "analyses": list(names), "models": models, "matrix": list(rows),
        "cross_model": [dataclasses.asdict(v) for v in cross],
        "cross_model_numbers": {"hubble": hubble, "gain_scaling": fit if isinstance(fit, str) else dataclasses.asdict(fit),
                                "temperature": temperature},
    })
