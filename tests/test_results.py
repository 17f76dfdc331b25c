"""Results: plain JSON out, the same result back in."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
from jaxtyping import Complex, Float, Int

from lensdyn import load_result
from lensdyn.results import Conventions, Provenance, Result


@dataclass(frozen=True, eq=False)
class SpectrumResult(Result):
    eigenvalues: Complex[np.ndarray, " n"]
    radius: Float[np.ndarray, " layer"]
    counts: Int[np.ndarray, " layer"]
    labels: tuple[str, ...]
    note: str | None = None

    def summary(self) -> str:
        return f"radius {self.radius.max():.3f}"


def make_result(**changes):
    values = dict(
        conventions=Conventions(aggregation="max over layers", excluded_positions=("first", "bos")),
        provenance=Provenance(
            model="m", weights="random", seed=3, layout="pre-norm", prompt_set="diverse",
            n_prompts=2, n_tokens=10, lensdyn_version="0", created="2026-01-01T00:00:00+00:00",
        ),
        eigenvalues=np.array([1 + 2j, 0.5 - 0.25j]),
        radius=np.array([1.5, float("nan"), 2.0]),
        counts=np.array([1, 2, 3]),
        labels=("a", "b"),
    )
    values.update(changes)
    return SpectrumResult(**values)


def test_json_round_trip_gives_the_same_result(tmp_path):
    result = make_result()
    path = result.to_json(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["kind"] == "SpectrumResult"
    assert data["eigenvalues"] == {"real": [1.0, 0.5], "imag": [2.0, -0.25]}
    assert data["conventions"]["excluded_positions"] == ["first", "bos"]
    loaded = load_result(path)
    assert isinstance(loaded, SpectrumResult) and loaded == result
    assert loaded.counts.dtype == np.int64 and np.iscomplexobj(loaded.eigenvalues)
    assert loaded.conventions.excluded_positions == ("first", "bos") and loaded.labels == ("a", "b")
    assert np.isnan(loaded.radius[1])


def test_results_differ_when_numbers_differ():
    assert make_result() != make_result(radius=np.array([1.5, 1.0, 2.0]))


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown result kind"):
        Result.from_dict({"kind": "NoSuchResult"})


def test_base_figure_is_not_silently_empty():
    with pytest.raises(NotImplementedError):
        make_result().figure()


@dataclass(frozen=True, eq=False)
class ScalarResult(Result):
    effect_size: float
    ratios: dict[str, float]
    bounds: tuple[float, ...]


def _reject(constant: str):
    raise ValueError(f"{constant} is not standard JSON")


def test_json_is_standard_and_restores_nan_and_infinities(tmp_path):
    """A strict parser (no NaN/Infinity constants, as JavaScript's JSON.parse) reads every result file."""
    result = ScalarResult(conventions=make_result().conventions, provenance=make_result().provenance,
                          effect_size=float("nan"), ratios={"a": float("inf"), "b": 2.0}, bounds=(float("-inf"), 1.0))
    path = result.to_json(tmp_path / "s.json")
    data = json.loads(path.read_text(), parse_constant=_reject)
    assert data["effect_size"] is None and data["ratios"]["a"] == "Infinity" and data["bounds"][0] == "-Infinity"
    loaded = load_result(path)
    assert np.isnan(loaded.effect_size) and loaded.ratios["a"] == float("inf") and loaded.bounds[0] == float("-inf")
    array = make_result(radius=np.array([float("inf"), float("nan"), 1.0]))
    data = json.loads(array.to_json(tmp_path / "a.json").read_text(), parse_constant=_reject)
    assert data["radius"] == ["Infinity", None, 1.0]
    reloaded = load_result(tmp_path / "a.json").radius
    assert reloaded[0] == float("inf") and np.isnan(reloaded[1]) and reloaded[2] == 1.0


def test_provenance_records_library_versions_and_files_without_them_still_load(tmp_path):
    from lensdyn.results import library_versions

    versions = library_versions()
    assert {"torch", "transformers", "transformer-lens"} <= set(versions)
    assert all(v[0].isdigit() for k, v in versions.items() if k in ("torch", "transformers", "transformer-lens"))
    path = make_result().to_json(tmp_path / "old.json")
    data = json.loads(path.read_text())
    del data["provenance"]["versions"], data["provenance"]["truncated"]  # a file written before these fields
    path.write_text(json.dumps(data))
    assert load_result(path).provenance.versions == {}
