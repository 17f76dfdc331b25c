"""``lensdyn study``: the claims x models matrix and the cross-model claims, on tiny random checkpoints.

Three sizes of one GQA family (llama, d_model 32 / 48 / 64) and an MHA gpt2, so each cross-model
claim is seen both testable and not; a tiny BERT stands for an encoder.
"""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import transformers as T

from conftest import tiny_checkpoint
from lensdyn.analyses import gains, registry
from lensdyn.analyses.expansion import ExpansionParameters
from lensdyn.app import study
from lensdyn.app.cli import main
from lensdyn.prompts import PromptSet
from lensdyn.verdicts import DOES_NOT_HOLD, HOLDS, NOT_TESTABLE

TEXTS = [" ".join(f"w{(7 * i + 3 * j) % 110 + 5}" for j in range(8 + i)) for i in range(6)]
OPTIONS = study.StudyOptions(control_seeds=(0,), n_bootstrap=20)
CHOSEN = [(registry.get("expansion"), ExpansionParameters(n_permutations=20)),
          (registry.get("gains"), registry.get("gains").parameters())]


def _llama(d_model: int):
    return T.LlamaConfig(vocab_size=120, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = {f"llama{d}": tiny_checkpoint(root / f"llama{d}", _llama(d), T.LlamaForCausalLM) for d in (32, 48, 64)}
    paths["gpt2"] = tiny_checkpoint(root / "gpt2", T.GPT2Config(vocab_size=120, n_embd=32, n_layer=3, n_head=4,
                                                                n_positions=64), T.GPT2LMHeadModel)
    paths["bert"] = tiny_checkpoint(root / "bert", T.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=64,
                                                                max_position_embeddings=64), T.BertForMaskedLM)
    return paths


@pytest.fixture(scope="module")
def prompts():
    return PromptSet.from_texts(TEXTS, name="tiny")


@pytest.fixture(scope="module")
def columns(checkpoints, prompts):
    """llama32, llama48, llama64 (GQA), gpt2 (MHA), each measured as ``lensdyn study`` does."""
    return [study.measure_model(checkpoints[name], prompts, CHOSEN, OPTIONS)
            for name in ("llama32", "llama48", "llama64", "gpt2")]


def _cross(columns) -> dict[str, object]:
    return {v.claim: v for v in study.cross_model_verdicts(columns)}


HUBBLE, SCALING, TEMPERATURE = (c.claim for c in study.CROSS_CLAIMS)


# --- pure functions ---------------------------------------------------------------------------


def test_compare_hubble_matches_a_hand_computation():
    # a: 2 blocks whose rate per relative depth is x; b: 4 blocks whose rate is 2x + 1; both linear, so
    # interpolation is exact on the shared range [0.25, 0.75]: r = 1, means 0.5 and 2.0, ratio 4.
    a = np.array([0.25, 0.75]) / 2
    b = (2 * (np.arange(4) + 0.5) / 4 + 1) / 4
    c = study.compare_hubble({"a": a, "b": b})
    assert c.grid[0] == pytest.approx(0.25) and c.grid[-1] == pytest.approx(0.75)
    (_, _, r, ratio), = c.pairs
    assert r == pytest.approx(1.0) and ratio == pytest.approx(4.0)
    assert c.holds() is False  # the same shape, four times the expansion
    falling = study.compare_hubble({"a": a, "b": b[::-1]})
    assert falling.pairs[0][2] == pytest.approx(-1.0)
    # The same a(x) at two depths: 2 blocks of H = x / 2, 4 blocks of H = x / 4 (plus one): identical curves.
    same = study.compare_hubble({"2": (np.array([0.25, 0.75]) + 1) / 2, "4": ((np.arange(4) + 0.5) / 4 + 1) / 4})
    assert same.pairs[0][2] == pytest.approx(1.0) and same.pairs[0][3] == pytest.approx(1.0)
    assert same.holds() is True


def test_compare_hubble_flat_curve_is_undefined_and_opposite_signs_fail():
    flat = study.compare_hubble({"a": np.array([0.1, 0.1]), "b": np.array([0.05, 0.05, 0.05, 0.05])})
    assert math.isnan(flat.pairs[0][2]) and flat.holds() is None
    assert study.mean_ratio(-0.2, 0.3) == math.inf
    with pytest.raises(study.ArgumentError, match="at least 2"):
        study.compare_hubble({"a": np.array([0.1, 0.2])})


def test_temperature_rule_on_synthetic_fits():
    def column(name, kind, c, r2=0.9):
        return study.Column(name, {}, {}, {}, temperature=SimpleNamespace(attention_type=kind, tau_c=c, tau_r2=r2))

    holds = _cross([column("a", "MHA", 27.0), column("b", "GQA", 4.0)])[TEMPERATURE]
    assert holds.verdict == HOLDS and "MHA C 27.00" in holds.measured
    assert _cross([column("a", "MHA", 1.0), column("b", "GQA", 4.0)])[TEMPERATURE].verdict == DOES_NOT_HOLD
    # A fit below R^2 0.5 does not count: one type left, nothing to compare.
    weak = _cross([column("a", "MHA", 1.0, r2=0.2), column("b", "GQA", 4.0)])[TEMPERATURE]
    assert weak.verdict == NOT_TESTABLE and "needs 2" in weak.note


# --- measured on tiny checkpoints ------------------------------------------------------------


def test_matrix_is_claims_by_models(columns):
    rows = study.verdict_matrix(columns, ["expansion", "gains"])
    n_claims = len(registry.get("expansion").result.claims) + len(registry.get("gains").result.claims)
    assert len(rows) == n_claims
    assert all(list(r["cells"]) == [c.model for c in columns] for r in rows)
    assert all(r["cells"][c.model]["verdict"] in (HOLDS, DOES_NOT_HOLD, NOT_TESTABLE) for r in rows for c in columns)
    assert [c.provenance["attention_type"] for c in columns] == ["GQA", "GQA", "GQA", "MHA"]
    text = study.matrix_text(rows, [c.model for c in columns])
    assert len(text.splitlines()) == n_claims + 1


def test_scaling_needs_three_sizes_and_is_gains_scaling(columns):
    two = _cross(columns[:2])[SCALING]
    assert two.verdict == NOT_TESTABLE and "at least 3 models of different sizes" in two.note
    three = _cross(columns[:3])[SCALING]
    assert three.verdict in (HOLDS, DOES_NOT_HOLD)
    fit = gains.scaling([c.gains for c in columns[:3]])
    assert study.gain_scaling(columns[:3]) == fit
    assert three.measured.startswith(f"exponent {fit.exponent:.3f} +- {fit.exponent_se:.3f}")
    low, _ = study.exponent_interval(fit)
    assert three.verdict == (HOLDS if fit.exponent > 0 and low > 0 else DOES_NOT_HOLD)


def test_hubble_claim_compares_every_pair(columns):
    one = _cross(columns[:1])[HUBBLE]
    assert one.verdict == NOT_TESTABLE and "needs at least 2" in one.note
    found = study.hubble_comparisons(columns)
    expected = study.compare_hubble({c.model: c.expansion.causal.hubble for c in columns})
    assert [p[:2] for p in found["causal_inverse"].pairs] == [p[:2] for p in expected.pairs] and len(expected.pairs) == 6
    np.testing.assert_allclose([p[2] for p in found["causal_inverse"].pairs], [p[2] for p in expected.pairs])
    verdict = _cross(columns)[HUBBLE]
    holds = found["causal_inverse"].holds() and found["euclidean"].holds()
    assert verdict.verdict == (NOT_TESTABLE if holds is None else HOLDS if holds else DOES_NOT_HOLD)


def test_temperature_claim_is_untestable_with_one_attention_type(columns):
    verdict = _cross(columns[:3])[TEMPERATURE]  # three GQA llamas
    assert verdict.verdict == NOT_TESTABLE and "the comparison needs 2" in verdict.note
    assert verdict.note.count(" GQA: C ") == 3  # each model says what its sweep gave
    assert all(c.temperature is not None and c.temperature.attention_type == "GQA" for c in columns[:3])


def test_encoder_skips_a_causal_analysis_with_the_reason(checkpoints, prompts):
    steering = registry.get("steering")
    chosen = [CHOSEN[0], (steering, steering.parameters())]
    column = study.measure_model(checkpoints["bert"], prompts, chosen,
                                 study.StudyOptions(control="none", n_bootstrap=0, temperature=False))
    assert column.skipped["steering"].startswith(study.NOT_CAUSAL)
    rows = study.verdict_matrix([column], ["expansion", "steering"])
    cells = [r["cells"][column.model]["verdict"] for r in rows if r["analysis"] == "steering"]
    assert cells and all(c.startswith(study.NOT_CAUSAL) for c in cells)
    assert all(r["cells"][column.model]["verdict"] in (HOLDS, DOES_NOT_HOLD, NOT_TESTABLE)
               for r in rows if r["analysis"] == "expansion")


def test_cli_writes_study_json_and_html(checkpoints, tmp_path):
    texts = tmp_path / "prompts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    models = [checkpoints["llama32"], checkpoints["gpt2"]]
    code = main(["study", "--models", *models, "--prompts", str(texts), "--analyses", "gains", "--bootstrap", "20",
                 "--control-seeds", "0", "--no-temperature", "--out", str(out)])
    assert code == 0
    index = json.loads((out / "study.json").read_text())
    assert list(index["models"]) == models
    assert {"n_params", "layout", "attention_type"} <= set(index["models"][models[0]]["provenance"])
    assert len(index["matrix"]) == len(registry.get("gains").result.claims)
    assert [v["claim"] for v in index["cross_model"]] == [HUBBLE, SCALING, TEMPERATURE]
    page = (out / "study.html").read_text()
    assert 'id="matrix"' in page and "Across models" in page
    assert main(["study", "--models", models[0], "--analyses", "nope", "--out", str(out)]) == 2
