"""The contract every registered analysis keeps (``lensdyn.analyses.registry``).

Its declaration agrees with its module (parameters whose defaults are ``measure()``'s, options that
two analyses share declared alike), and its result, measured on a real capture, round-trips
through JSON and ``ld.load_result``, summarises as text, draws a plotly Figure and judges its claims.
A new analysis is held to all of it without an entry here; ``CASES`` only makes the costly ones small.
"""
import dataclasses
import importlib
import inspect
import typing
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import lensdyn as ld
from lensdyn.analyses import registry
from lensdyn.results import FRAME_COLUMNS, Result, attach_control
from lensdyn.verdicts import Verdict

ANALYSES = registry.analyses()
PROMPTS = ("The river rose to the fourth step of the old mill before dawn.",
           "Snow fell on the quiet village all night long, and nobody went out.")


@dataclass(frozen=True)
class Case:
    """Where an analysis is measured here, and how small: its model (a fixture), parameters through the
    registry's dataclass, and ``measure()`` keywords that are not command-line parameters."""

    model: str = "minilm"
    parameters: dict = field(default_factory=dict)
    keywords: dict = field(default_factory=dict)


CASES = {
    "expansion": Case(parameters={"n_permutations": 5}),
    "curvature": Case(parameters={"n_draws": 5}),
    # Arnoldi on minilm's blocks takes about a minute even for one block; on the tiny model, seconds.
    "stability": Case("tiny_model", {"layers": (0,), "profile_prompts": 1, "context": 8, "betas": (1.0,)},
                      {"k": 3, "k_grid": (1, 2, 4, 8)}),
    "steering": Case("smollm2", {"layers": (2, 10), "transfer_layers": (2, 10), "relative": (0.5,), "n_bootstrap": 5},
                     {"n_evaluation": 2}),
}


def case(analysis: registry.Analysis) -> Case:
    return CASES.get(analysis.name, Case("smollm2" if analysis.causal else "minilm"))


def measured(analysis: registry.Analysis, request):
    """The analysis's result on its case's capture, without a control."""
    spec = case(analysis)
    model = request.getfixturevalue(spec.model)
    # A tiny model has no tokenizer: it reads token ids.
    prompts = PROMPTS if getattr(model, "tokenizer", None) is not None else torch.randint(
        0, model.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    cap = ld.capture(model, prompts, streams=analysis.streams)
    parameters = dataclasses.replace(analysis.parameters(), **spec.parameters)
    return analysis.measure(cap, **analysis.keywords(parameters, model=model, control=None, seed=0), **spec.keywords)


def on_a_capture(analysis: registry.Analysis):
    tiny = case(analysis).model.startswith("tiny")
    return pytest.param(analysis, id=analysis.name, marks=() if tiny else pytest.mark.slow)


@pytest.mark.parametrize("analysis", [on_a_capture(a) for a in ANALYSES])
def test_results_round_trip_summarise_draw_and_judge(analysis, request, tmp_path):
    result = measured(analysis, request)
    assert type(result) is analysis.result
    if not analysis.keeps_reference_apart:  # a control nested inside must come back too
        result = attach_control(result, result)
    assert ld.load_result(result.to_json(tmp_path / f"{analysis.name}.json")) == result
    summary = result.summary()
    assert isinstance(summary, str) and summary.strip()
    assert isinstance(result.figure(), go.Figure)
    if analysis.keeps_reference_apart:  # the report draws a reference kept apart beside the result
        assert isinstance(result.figure(control=result), go.Figure)
    verdicts = result.verdicts()
    assert isinstance(verdicts, list) and all(isinstance(v, Verdict) for v in verdicts)
    assert_tidy(result)


def assert_tidy(result: Result) -> None:
    """``to_frame`` holds the result's numbers, one row each: its 1-D arrays entry by entry and its scalars, the
    control's under role "control"."""
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(FRAME_COLUMNS) and len(frame)
    assert not frame.duplicated(["role", "axis", "index", "statistic"]).any()
    assert frame.attrs["kind"] == result.kind and frame.attrs["provenance"]["model"] == result.provenance.model
    control = getattr(result, "control", None)
    roles = [("model", result)] + [("control", control)] * isinstance(control, Result)
    for role, part in roles:
        rows = frame[frame.role == role]
        assert set(rows.model) == {part.provenance.model} and set(rows.weights) == {part.provenance.weights}
        checked = 0
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if f.metadata.get("transient") or f.name == "control":
                continue
            if isinstance(value, np.ndarray) and value.ndim == 1 and not np.iscomplexobj(value):
                mine = rows[rows.statistic == f.name].sort_values("index")
                assert mine["index"].tolist() == list(range(len(value))), f.name
                np.testing.assert_array_equal(mine.value.to_numpy(), value.astype(float), err_msg=f.name)
                checked += 1
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                mine = rows[rows.statistic == f.name]
                assert mine.axis.tolist() == ["scalar"] and mine["index"].isna().all(), f.name
                np.testing.assert_array_equal(mine.value.to_numpy(), [float(value)], err_msg=f.name)
                checked += 1
        assert checked or role == "control", f"{result.kind}: no array or scalar field to check"


@pytest.mark.parametrize("analysis", ANALYSES, ids=lambda a: a.name)
def test_parameters_are_measure_keywords_with_its_defaults(analysis):
    signature = inspect.signature(analysis.measure).parameters
    hints = typing.get_type_hints(analysis.parameters)
    for f in dataclasses.fields(analysis.parameters):
        assert f.name in signature and signature[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert f.default == signature[f.name].default, f"{analysis.name}.{f.name}: {f.default} != measure()'s"
        assert f.metadata.get("help"), f"{analysis.name}.{f.name} has no help line"
        assert "capture" not in f.metadata or hints[f.name] is bool, f"{f.name}: only a switch can ask the capture"
    assert set(analysis.reference_keywords) <= set(signature)


@pytest.mark.parametrize("analysis", ANALYSES, ids=lambda a: a.name)
def test_the_declaration_is_its_modules(analysis):
    module = importlib.import_module(analysis.measure.__module__)
    assert module.ANALYSIS is analysis and registry.get(analysis.name) is analysis
    assert analysis.streams == module.STREAMS and analysis.result.__module__ == module.__name__


def test_options_two_analyses_share_are_declared_alike():
    """``report`` reads a shared option (--aggregation: expansion and gains) once, for both."""
    seen = {}
    for analysis in ANALYSES:
        hints = typing.get_type_hints(analysis.parameters)
        for f in dataclasses.fields(analysis.parameters):
            declared = (f.name, hints[f.name], f.default, f.metadata.get("choices"))
            assert seen.setdefault(registry.flag(f), declared) == declared, f"{analysis.name}: {registry.flag(f)}"


def test_helpers_of_the_analyses_floor_are_not_analyses():
    names = {a.name for a in ANALYSES}
    assert len(names) == len(ANALYSES) and not names & {"idealized", "measure", "registry"}
    assert [a.order for a in ANALYSES] == sorted(a.order for a in ANALYSES)
