"""Write-up claims, judged on a measured result by rules written in code, never typed by hand, each with its uncertainty.

A ``Claim`` names its write-up, states the claim and the rule, and carries a ``test``: a function
of a result that returns what was measured (text) and whether the rule holds (True / False, or
None when this result cannot test it). A rule decided by a p-value also names it (``p_value``:
the raw p and, for a null drawn at random, the number of draws) and an effect size with its
floor (``effect``, ``floor``): it holds only if the test holds, the effect reaches the floor and
the Holm-corrected p is below ``ALPHA``.

``judge(results)`` judges every claim of every result (a result's claims are its class's
``claims``) as one family:

1. **Point verdict** on the result as measured: "holds", "does not hold", or "not testable here"
   (the test is undefined, the result is on fewer than ``MIN_PROMPTS`` prompts for a share rule,
   or a null has too few draws, below).
2. **Holm correction** across the family's p-value claims (Holm 1979): the ``i``-th smallest of
   ``m`` p-values is multiplied by ``m - i + 1`` (running maximum, capped at 1). Claims of *absence*
   ("no position dependence", decided by ``p >= 0.05``) are not in the family: correcting them would
   make them easier to pass.
3. **Draws.** A null drawn ``N`` times cannot give a p below ``1 / (N + 1)``. A claim whose smallest
   attainable corrected p, ``factor / (N + 1)``, is above ``ALPHA / 2`` is "not testable at N
   draws": the verdict would be deciding on the draw count.
4. **Bootstrap** (``n_bootstrap`` resamples, seeded by ``seed``): each result's ``resample(rng)``
   redraws its prompts with replacement (and what its analysis states within them) and the
   same rules run on each resample, a p-value claim with its point Holm factor against the
   nulls as drawn. ``bootstrap_share`` is the share of resamples in which the rule holds; the
   verdict is **robust** when at least ``ROBUST`` of the resamples agree with it, else **fragile**;
   **not testable** when the verdict is, or the result cannot be resampled (fewer than
   ``MIN_PROMPTS`` prompts, or no per-prompt data, as in a result read back from JSON).
5. **References.** The reference column holds the same measurement on each reference result (the
   untrained controls, one per control seed, or a ``--compare`` model). A claim that reads the
   control itself is judged on the first; in each bootstrap resample a control is drawn at
   random from all of them, so the share covers "which untrained sample" too.

Written here rather than taken from scipy: ``scipy.stats.false_discovery_control`` is
Benjamini-Hochberg (a false discovery rate), not Holm's family-wise control, so ``holm`` is a few
lines tested against a hand computation; ``scipy.stats.bootstrap`` resamples arrays for one
statistic, while a verdict's bootstrap redraws whole results (every claim of an analysis on the
same resample, prompts as clusters), which each result's ``resample`` does from its own sums.

>>> claim = Claim("toy write-up", "norms grow", "a(L) > 1", lambda r: (f"a(L) = {r}", r > 1))
>>> judge([3.0], claims=[[claim]])[0].verdict
'holds'
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

HOLDS, DOES_NOT_HOLD, NOT_TESTABLE = "holds", "does not hold", "not testable here"
ROBUST_LABEL, FRAGILE_LABEL, UNTESTABLE_LABEL = "robust", "fragile", "not testable"
ALPHA = 0.05  # the family-wise error rate of one report's p-value claims
ROBUST = 0.95  # the share of bootstrap resamples that must agree with a robust verdict
MIN_PROMPTS = 5  # fewer prompts: no bootstrap, and a caveat on the verdict
N_BOOTSTRAP = 200


@dataclass(frozen=True)
class Claim:
    """One claim of one write-up, with the rule that decides it on a measured result."""

    source: str  # the write-up
    claim: str
    rule: str
    test: Callable[[object], tuple[str, bool | None]]  # result -> (measured, holds?), p-value and floor aside
    # result -> (raw p, null draws or None for an analytic p); the claim is then in the Holm family.
    p_value: Callable[[object], tuple[float, int | None]] | None = None
    effect: Callable[[object], float] | None = None  # result -> effect size, compared with ``floor``
    floor: float = 0.0  # the least effect that is not negligible (stated with its reason in the rule)
    effect_units: str = ""
    units: str = ""  # the units of the measured value ("" where it states its own: a count, "x", "deg", "%")


@dataclass(frozen=True)
class Verdict:
    """A claim judged on one model: the measured value, the reference's, the verdict and its uncertainty."""

    source: str
    claim: str
    rule: str
    measured: str
    reference: str  # the same measurement on each reference result, " | "-joined ("-" when there is none)
    verdict: str  # HOLDS, DOES_NOT_HOLD or NOT_TESTABLE
    robustness: str = UNTESTABLE_LABEL  # ROBUST_LABEL, FRAGILE_LABEL or UNTESTABLE_LABEL
    bootstrap_share: float | None = None  # share of resamples in which the rule holds
    n_resamples: int = 0
    effect: float | None = None
    effect_floor: float | None = None
    effect_units: str = ""
    p_value: float | None = None
    p_corrected: float | None = None  # Holm, across the report's p-value claims
    null_draws: int | None = None
    n_prompts: int | None = None
    note: str = ""  # why a verdict is not testable, or what it rests on
    units: str = ""  # the units of ``measured`` and ``reference`` (``Claim.units``)

    @property
    def robustness_text(self) -> str:
        """The robustness label with what it rests on: the share of resamples, or why there is none."""
        if self.n_prompts is not None and self.n_prompts < MIN_PROMPTS:
            return f"{self.robustness} ({self.n_prompts} prompt{'s' if self.n_prompts != 1 else ''})"
        if self.bootstrap_share is None or self.verdict == NOT_TESTABLE:
            return self.robustness
        return f"{self.robustness} (holds in {self.bootstrap_share:.0%} of {self.n_resamples})"


def finite(holds, *values) -> bool | None:
    """``holds`` where every value its rule reads is finite, else None: an undefined statistic (a flat
    fit's NaN R^2) makes a claim "not testable here", never "does not hold".

    >>> finite(0.3 > 0.5, 0.3), finite(float("nan") > 0.5, float("nan"))
    (False, None)
    """
    return bool(holds) if all(math.isfinite(float(v)) for v in values) else None


def holm(p_values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjusted p-values and each one's factor ``m - rank``.

    ``adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the p-values sorted ascending.

    >>> adjusted, factor = holm([0.01, 0.04, 0.03])
    >>> adjusted.round(3).tolist(), factor.tolist()
    ([0.03, 0.06, 0.06], [3, 1, 2])
    """
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    factor = np.empty(len(p), dtype=np.int64)
    factor[order] = len(p) - np.arange(len(p))
    adjusted = np.empty(len(p))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * factor[order]))
    return adjusted, factor


def least_draws(factor: int, alpha: float = ALPHA) -> int:
    """The fewest null draws whose smallest attainable p, times ``factor``, is at most ``alpha / 2``.

    >>> least_draws(4)       # 4 p-value claims: 1 / 160 * 4 = 0.025
    159
    """
    return math.ceil(2 * factor / alpha) - 1


@dataclass(frozen=True)
class _Decision:
    measured: str
    holds: bool | None
    effect: float | None = None
    p: float | None = None
    draws: int | None = None


def _decide(claim: Claim, result, factor: int | None, alpha: float) -> _Decision:
    """The claim's rule on one result; a p-value claim with Holm ``factor`` (None: the raw p is kept for later)."""
    measured, holds = claim.test(result)
    if holds is None:
        return _Decision(measured, None)
    holds = bool(holds)
    effect = None
    if claim.effect is not None:
        effect = float(claim.effect(result))
        if not math.isfinite(effect):
            return _Decision(measured, None)
        holds = holds and effect >= claim.floor
    if claim.p_value is None:
        return _Decision(measured, holds, effect)
    p, draws = claim.p_value(result)
    if not math.isfinite(p):
        return _Decision(measured, None, effect, p, draws)
    if factor is not None:
        holds = holds and min(1.0, p * factor) < alpha
    return _Decision(measured, holds, effect, float(p), draws)


def _verdict_word(holds: bool | None) -> str:
    return NOT_TESTABLE if holds is None else HOLDS if holds else DOES_NOT_HOLD


def judge(
    results: Sequence[object],
    *,
    claims: Sequence[Sequence[Claim]] | None = None,
    references: Sequence[Sequence[object]] | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
    alpha: float = ALPHA,
) -> list[Verdict]:
    """Every claim of every result, judged as one family (module docstring): Holm, draws, bootstrap.

    Args:
        results: the measured results (one per analysis).
        claims: each result's claims (default: its class's ``claims``).
        references: each result's reference results (default: ``(result.control,)`` when it has one).
        n_bootstrap: resamples per result (0: no bootstrap, every robustness "not testable").
        seed: seeds the resamples (the null seed, never the control's).
    """
    claims = [tuple(getattr(type(r), "claims", ())) for r in results] if claims is None else [tuple(c) for c in claims]
    if references is None:
        references = [() if getattr(r, "control", None) is None else (r.control,) for r in results]
    rows = [(i, claim, _decide(claim, result, None, alpha))
            for i, (result, own) in enumerate(zip(results, claims)) for claim in own]
    in_family = [k for k, (_, _, d) in enumerate(rows) if d.p is not None and math.isfinite(d.p)]
    adjusted, factors = holm([rows[k][2].p for k in in_family]) if in_family else (np.array([]), np.array([]))
    corrected = {k: (float(a), int(f)) for k, a, f in zip(in_family, adjusted, factors)}

    verdicts = []
    for k, (i, claim, point) in enumerate(rows):
        result = results[i]
        n_prompts = getattr(getattr(result, "provenance", None), "n_prompts", None)
        holds, note = point.holds, ""
        p_corrected, factor = corrected.get(k, (None, None))
        if holds and p_corrected is not None:
            # A rule that fails on its test or its effect floor fails whatever the draws; one that passes
            # them is decided by p, which these draws may not be able to resolve.
            holds = p_corrected < alpha
            if point.draws is not None and factor / (point.draws + 1) > alpha / 2:
                holds = None
                note = (f"not testable at {point.draws} null draws: the smallest p they allow, 1/{point.draws + 1}, "
                        f"times its Holm factor {factor} is above {alpha / 2:g}; use at least {least_draws(factor, alpha)}")
        elif point.holds is None:
            note = "the statistic is undefined on this result"
        if n_prompts is not None and n_prompts < MIN_PROMPTS:
            note = (note + "; " if note else "") + f"on {n_prompts} prompt(s), fewer than {MIN_PROMPTS}: no bootstrap"
        refs = references[i]
        verdicts.append(Verdict(
            source=claim.source, claim=claim.claim, rule=claim.rule, measured=point.measured,
            reference=" | ".join(claim.test(ref)[0] for ref in refs) if refs else "-",
            verdict=_verdict_word(holds), effect=point.effect,
            effect_floor=claim.floor if claim.effect is not None else None, effect_units=claim.effect_units,
            p_value=point.p, p_corrected=p_corrected, null_draws=point.draws, n_prompts=n_prompts, note=note,
            units=claim.units,
        ))
    if n_bootstrap > 0:
        verdicts = _bootstrap(results, claims, references, rows, corrected, verdicts, n_bootstrap, seed, alpha)
    return verdicts


def _bootstrap(results, claims, references, rows, corrected, verdicts, n_bootstrap, seed, alpha) -> list[Verdict]:
    """Verdicts with their bootstrap share and robustness label (module docstring, step 4)."""
    with _one_thread():
        return _resample_all(results, claims, references, rows, corrected, verdicts, n_bootstrap, seed, alpha)


@contextlib.contextmanager
def _one_thread():
    """One thread for torch and the BLAS while resampling: a resample is many tiny array operations,
    which threads only slow down (waking them costs more than the work, worse on a busy machine)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def _resample_all(results, claims, references, rows, corrected, verdicts, n_bootstrap, seed, alpha) -> list[Verdict]:
    rng = np.random.default_rng(seed)
    holds_count = np.zeros(len(rows))  # resamples in which the rule holds
    fails_count = np.zeros(len(rows))  # ... in which it does not hold (the rest: undefined)
    resampled = np.zeros(len(rows), dtype=bool)
    first_row = 0
    for i, (result, own) in enumerate(zip(results, claims)):
        n_prompts = getattr(getattr(result, "provenance", None), "n_prompts", None)
        span = list(range(first_row, first_row + len(own)))
        first_row += len(own)
        resample = getattr(result, "resample", None)
        draw = resample(rng) if resample is not None and (n_prompts is None or n_prompts >= MIN_PROMPTS) else None
        if draw is None:  # this result cannot be resampled: its verdicts keep robustness "not testable"
            continue
        controls = list(references[i]) if getattr(result, "control", None) is not None else []
        for b in range(n_bootstrap):
            draw = draw if b == 0 else resample(rng)
            if controls and dataclasses.is_dataclass(draw):
                draw = dataclasses.replace(draw, control=controls[int(rng.integers(len(controls)))])
            for k in span:
                holds = _decide(rows[k][1], draw, corrected.get(k, (None, 1))[1], alpha).holds
                holds_count[k] += holds is True
                fails_count[k] += holds is False
        resampled[span] = True
    out = []
    for k, v in enumerate(verdicts):
        if not resampled[k]:
            out.append(v)
            continue
        share = float(holds_count[k] / n_bootstrap)
        agree = share if v.verdict == HOLDS else float(fails_count[k] / n_bootstrap)
        label = UNTESTABLE_LABEL if v.verdict == NOT_TESTABLE else ROBUST_LABEL if agree >= ROBUST else FRAGILE_LABEL
        out.append(dataclasses.replace(v, robustness=label, bootstrap_share=share, n_resamples=n_bootstrap))
    return out


def verdict_table(verdicts: Sequence[Verdict], reference_label: str = "control") -> str:
    """A fixed-width text table of verdicts (the summary's text form).

    >>> print(verdict_table([Verdict("w", "c", "r", "1.0", "0.5", HOLDS, ROBUST_LABEL, 0.97, 200)]))
    claim  measured  control  verdict  robustness
    c      1.0       0.5      holds    robust (holds in 97% of 200)
    """
    rows = [("claim", "measured", reference_label, "verdict", "robustness")]
    rows += [(v.claim, v.measured, v.reference, v.verdict, v.robustness_text) for v in verdicts]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
