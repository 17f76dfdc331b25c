"""Measuring a model and its references on one prompt set, and judging the claims: what ``lensdyn report`` (and ``study``) run.

    runs = reference_runs("smollm2-135m", control_seeds=(0, 1, 2))      # three untrained controls
    measured = measure_runs(models, prompts, chosen, ...)              # one capture per model, every analysis
    verdicts = judge_measured(measured, n_bootstrap=200, seed=0)       # one family: Holm, draws, bootstrap

The untrained control is one sample of "untrained"; the report draws several (``control_seeds``,
each a different random initialisation) and shows the spread of their values in the verdict
table's reference column. The first one is the control every figure and JSON file carries. The
seeds of the nulls and of the bootstrap are separate (``seed``), so either can be varied alone.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lensdyn.results import Result, attach_control
from lensdyn.verdicts import Verdict, judge

CONTROL_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    """One model a report measures: the model itself, or one of its references."""

    role: str  # "model", "reference" (the control figures and files carry), "reference-<seed>"
    model: str
    weights: str
    seed: int  # of random weights


def reference_runs(model: str, weights: str, *, control: str, compare: str | None,
                   control_seeds: Sequence[int] = CONTROL_SEEDS) -> list[Run]:
    """The runs of a report: its references (a ``compare`` model, or one untrained control per seed), then the model.

    >>> [r.role for r in reference_runs("m", "pretrained", control="random", compare=None, control_seeds=(0, 5))]
    ['reference', 'reference-5', 'model']
    """
    runs = []
    if compare:
        runs.append(Run("reference", compare, "pretrained", control_seeds[0]))
    elif control == "random" and weights != "random":
        runs += [Run("reference" if i == 0 else f"reference-{seed}", model, "random", seed)
                 for i, seed in enumerate(control_seeds)]
    return runs + [Run("model", model, weights, control_seeds[0])]


@dataclass
class Measured:
    """Every chosen analysis measured on one prompt set: each model result (with its control attached),
    its references, and the seconds each step took per run."""

    results: dict[str, Result]  # analysis -> the model's result
    references: dict[str, list[Result]]  # analysis -> one result per reference run (first: the attached control)
    timings: dict[str, dict[str, float]]


def measure_runs(
    runs: Sequence[Run],
    measure_one: Callable[[Run], dict[str, Result]],
    *,
    keeps_reference_apart: Callable[[str], bool],
    side_by_side: bool = True,
) -> Measured:
    """``measure_one(run)`` (analysis -> result) for every run, two at a time unless not ``side_by_side``.

    Runs share nothing until the end: measuring two side by side overlaps one's Python-bound steps
    (clustering, nulls, hooks) with the other's matrix work. More than two would only contend on
    a few cores.
    """
    # The model first: a reference may wait for something of the model's capture (its massive positions).
    order = sorted(runs, key=lambda r: r.role != "model")
    if side_by_side and len(runs) > 1:
        with ThreadPoolExecutor(max_workers=2) as pool:
            by_role = dict(zip((r.role for r in order), pool.map(measure_one, order)))
    else:
        by_role = {r.role: measure_one(r) for r in order}
    model = by_role["model"]
    references = {name: [by_role[r.role][name] for r in runs if r.role != "model"] for name in model}
    results = {}
    for name, result in model.items():
        if references[name] and not keeps_reference_apart(name):
            result = attach_control(result, references[name][0])
        results[name] = result
    return Measured(results=results, references=references, timings={})


def judge_measured(measured: Measured, names: Sequence[str], *, n_bootstrap: int, seed: int) -> list[Verdict]:
    """The claims of every analysis in ``names``, judged as one family (``lensdyn.verdicts.judge``)."""
    started = time.perf_counter()
    verdicts = judge([measured.results[n] for n in names], references=[measured.references[n] for n in names],
                     n_bootstrap=n_bootstrap, seed=seed)
    measured.timings.setdefault("verdicts", {})["bootstrap_s"] = round(time.perf_counter() - started, 3)
    return verdicts


def agreement(by_set: dict[str, Sequence[Verdict]]) -> list[dict[str, object]]:
    """Per claim, its verdict on each prompt set and whether they all agree (the sets judged the same claims).

    >>> v = Verdict("w", "c", "r", "1", "-", "holds")
    >>> agreement({"a": [v], "b": [dataclasses.replace(v, verdict="does not hold")]})[0]["agree"]
    False
    """
    rows = []
    sets = list(by_set)
    for i, first in enumerate(by_set[sets[0]]):
        on = {name: by_set[name][i].verdict for name in sets}
        rows.append({"source": first.source, "claim": first.claim, "verdicts": on, "agree": len(set(on.values())) == 1})
    return rows
