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
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from lensdyn import parallel
from lensdyn.results import Result, attach_control
from lensdyn.verdicts import Verdict, judge

CONTROL_SEEDS = (0, 1, 2)
# The default pace of a corpus run's writes (lensdyn.app.corpus.run_corpus): a stopped run loses at most about
# this many seconds. Here, not in the corpus module, so that the command line's --help needs no torch.
CHECKPOINT_SECONDS = 60.0


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
    truncated: dict[str, tuple[tuple[int, ...], int]] = dataclasses.field(default_factory=dict)  # role -> (cut, of n)


def measure_prompt_set(
    runs: Sequence[Run],
    models: dict[str, object],
    prompts,
    chosen: Sequence[tuple[object, object]],
    *,
    exclude: tuple[str, ...],
    batch_size: int,
    truncate: bool,
    seed: int,
    side_by_side: bool = True,
    timings: dict[str, dict[str, float]] | None = None,
    on_step: Callable[[str, str], None] | None = None,
) -> Measured:
    """One capture per run of ``prompts`` (``models``: role -> loaded model), then every chosen analysis
    (``(registry.Analysis, parameters)`` pairs) on it; ``on_step(role, step)`` after each step.

    The untrained controls leave out the model's massive positions, not their own (``exclude``
    holding ``"massive"``): token for token. The model's capture hands them over once it has them.
    A ``--compare`` model (pretrained reference) finds its own: another tokenizer.
    """
    from lensdyn.hooks.capture import capture

    timings = {r.role: {} for r in runs} if timings is None else timings
    controls = [r for r in runs if r.role != "model" and r.weights == "random" and r.model == runs[-1].model]
    massive_from = Future() if "massive" in exclude and controls else None
    truncated: dict[str, tuple[tuple[int, ...], int]] = {}
    streams = sorted({s for analysis, _ in chosen for s in analysis.streams})

    def measure_one(r: Run) -> dict[str, Result]:
        model, steps, out = models[r.role], timings.setdefault(r.role, {}), {}
        # A reference runs as each analysis's reference_keywords say (no diagnostics meant for the model only).
        keywords = {analysis.name: analysis.keywords(parameters, model=model, control=None, seed=seed, progress=True,
                                                     **({} if r.role == "model" else analysis.reference_keywords))
                    for analysis, parameters in chosen}
        needs = {k: v for analysis, _ in chosen for k, v in analysis.capture_options(keywords[analysis.name]).items()}
        if massive_from is not None and r in controls:
            needs["massive_from"] = massive_from  # waited for after this run's own forward passes
        began = time.perf_counter()
        try:
            cap = capture(model, prompts, exclude=exclude, batch_size=batch_size, streams=streams, truncate=truncate,
                          **needs)
        except BaseException as err:
            if massive_from is not None and r.role == "model":
                massive_from.set_exception(err)  # the controls wait for this capture: they fail too, not hang
            raise
        if massive_from is not None and r.role == "model":
            massive_from.set_result(cap)
        steps["capture_s"] = round(steps.get("capture_s", 0.0) + time.perf_counter() - began, 3)
        truncated[r.role] = (tuple(cap.truncated), cap.n_prompts)
        if on_step:
            on_step(r.role, "capture")
        for analysis, _ in chosen:
            began = time.perf_counter()
            out[analysis.name] = analysis.measure(cap, **keywords[analysis.name])
            steps[analysis.name] = round(steps.get(analysis.name, 0.0) + time.perf_counter() - began, 3)
            if on_step:
                on_step(r.role, analysis.name)
        return out

    measured = measure_runs(runs, measure_one, side_by_side=side_by_side,
                            keeps_reference_apart=lambda name: next(a for a, _ in chosen if a.name == name).keeps_reference_apart)
    measured.timings, measured.truncated = timings, truncated
    return measured


def measure_runs(
    runs: Sequence[Run],
    measure_one: Callable[[Run], dict[str, Result]],
    *,
    keeps_reference_apart: Callable[[str], bool],
    side_by_side: bool = True,
) -> Measured:
    """``measure_one(run)`` (analysis -> result) for every run, two at a time unless not ``side_by_side``.

    Runs share nothing until the end: measuring two side by side (``lensdyn.parallel.side_by_side``,
    half of torch's threads each) overlaps one's Python-bound steps (clustering, nulls, hooks) with
    the other's matrix work. More than two would only contend on a few cores.
    """
    # The model first: a reference may wait for something of the model's capture (its massive positions).
    order = sorted(runs, key=lambda r: r.role != "model")
    if side_by_side and len(runs) > 1:
        by_role = dict(zip((r.role for r in order), parallel.side_by_side([partial(measure_one, r) for r in order])))
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
    return judge([measured.results[n] for n in names], references=[measured.references[n] for n in names],
                 n_bootstrap=n_bootstrap, seed=seed)


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
