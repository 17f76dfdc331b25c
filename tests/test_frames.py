"""Tidy tables (``Result.to_frame``): every number of a result, one row each, with its axis, index and units."""
import dataclasses

import numpy as np
import pytest
import torch

import lensdyn as ld
from lensdyn.analyses import norms
from lensdyn.corpus_result import CorpusResult
from lensdyn.results import Conventions, Provenance, attach_control

from conftest import synthetic_capture
from test_contract import assert_tidy


def provenance(model="m", weights="pretrained"):
    return Provenance(model=model, weights=weights, seed=0, layout="pre-norm", prompt_set="p", n_prompts=2,
                      n_tokens=10, lensdyn_version="0", created="now")


def corpus_result(n_layers=3, **overrides):
    """A corpus result whose every entry is its own position (``arange``): each row's value says where it came from."""
    state, block = np.arange(n_layers + 1.0), np.arange(n_layers + 0.0)
    fields = dict(n_shards=2, mean_norm=state, std_norm=state + 10, scale_factor=state + 20,
                  scale_factor_mean_of_ratios=state + 30, hubble_rate=block + 40, causal_scale_factor=state + 50,
                  attn_gain=block + 60, mlp_gain=block + 70, participation_ratio=state + 80,
                  top_eigenvalues=np.arange(2.0 * (n_layers + 1)).reshape(n_layers + 1, 2),
                  histogram=np.zeros((n_layers + 1, 3)), bins=np.linspace(-1, 1, 4),
                  energy=np.ones((2, n_layers + 1)), betas=np.array([1.0, 4.0]))
    return CorpusResult(Conventions(aggregation="ratio_of_means"), provenance(), **fields | overrides)


def test_corpus_result_rows_are_its_arrays():
    result = corpus_result()
    frame = result.to_frame()
    assert_tidy(result)
    mlp = frame[frame.statistic == "mlp_gain"]
    assert mlp.axis.unique().tolist() == ["block"] and mlp.value.tolist() == [70.0, 71.0, 72.0]
    assert set(mlp.units) == {"ratio of norms"}
    # A 2-D array: rows over the state axis, its other axis in the statistic's name.
    top = frame[frame.statistic.str.startswith("top_eigenvalues")].set_index(["index", "statistic"]).value
    assert top[(2, "top_eigenvalues[k=1]")] == 5.0 and len(top) == 8
    energy = frame[frame.statistic == "energy[beta=1]"]
    assert energy.axis.unique().tolist() == ["state"] and len(energy) == 4
    shards = frame[frame.statistic == "n_shards"]
    assert shards.value.tolist() == [2.0] and shards["index"].isna().all() and shards.axis.tolist() == ["scalar"]
    assert frame.attrs["conventions"]["aggregation"] == "ratio_of_means"
    assert frame.attrs["provenance"]["model"] == "m"
    assert set(frame.model) == {"m"} and set(frame.role) == {"model"}


def test_norms_known_answer():
    # Every token of state l has norm l + 1 (one coordinate set), so each state's mean norm is l + 1.
    n_layers, d = 3, 4
    resid = torch.zeros(n_layers + 1, 2, 5, d)
    for l in range(n_layers + 1):
        resid[l, ..., 0] = l + 1.0
    cap = synthetic_capture(torch.ones(2, 5, dtype=torch.bool), resid=resid)
    result = norms.measure(cap, control=None)
    assert_tidy(result)
    frame = result.to_frame()
    assert frame[frame.statistic == "mean"].value.tolist() == [1.0, 2.0, 3.0, 4.0]
    per_prompt = frame[frame.statistic == "prompt_mean[prompt=1]"]
    assert per_prompt.axis.unique().tolist() == ["state"] and per_prompt.value.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_nested_records_get_a_prefix_and_the_control_its_rows(tiny_model):
    from lensdyn.analyses import expansion

    cap = ld.capture(tiny_model, torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0)))
    result = expansion.measure(cap, model=tiny_model, control=None, n_permutations=5, seed=0)
    untrained = dataclasses.replace(result, provenance=dataclasses.replace(result.provenance, weights="random"),
                                    attn_growth=result.attn_growth + 1)
    result = attach_control(result, untrained)
    frame = result.to_frame()
    growth = frame[frame.statistic == "attn_growth"].pivot_table(index="index", columns="role", values="value")
    np.testing.assert_array_equal(growth["control"], result.attn_growth + 1)
    assert set(frame[frame.role == "control"].weights) == {"random"}
    assert frame.attrs["control_provenance"]["weights"] == "random"
    assert_tidy(result)
    scale = frame[(frame.statistic == "euclidean.scale_factor") & (frame.role == "model")].sort_values("index")
    np.testing.assert_array_equal(scale.value.to_numpy(), result.euclidean.scale_factor)
    assert scale.axis.unique().tolist() == ["state"]
    wide = frame[(frame.axis == "block") & (frame.role == "model")].pivot_table(index="index", columns="statistic",
                                                                               values="value")
    np.testing.assert_array_equal(wide["attn_growth"].to_numpy(), result.attn_growth)


def test_unannotated_and_complex_arrays_still_give_one_row_per_number():
    from lensdyn.results import _array_records, _dim_names

    assert _dim_names(None, 2, "x.grid") == ("grid_axis0", "grid_axis1")
    rows = list(_array_records(np.array([1 + 2j]), ("block",), "eig"))
    assert rows == [("block", 0, "eig.real", 1.0), ("block", 0, "eig.imag", 2.0)]


@pytest.mark.parametrize("statistic, units", [("efficacy_h_p", "p-value"), ("collapse_vs_v_spearman", "Spearman rho"),
                                              ("count", "count"), ("eval_norms", "L2 norm (activation units)"),
                                              ("tau", "")])
def test_units_are_read_off_names_or_left_unstated(statistic, units):
    assert corpus_result().units_of(statistic) == units
