"""Verdicts with their uncertainty (lensdyn.verdicts): Holm, draws, effect floors, undefined cases, the bootstrap."""
import dataclasses
import math

import numpy as np
import pytest

from lensdyn.resampling import prompt_counts
from lensdyn.verdicts import (
    DOES_NOT_HOLD, FRAGILE_LABEL, HOLDS, MIN_PROMPTS, NOT_TESTABLE, ROBUST_LABEL, UNTESTABLE_LABEL, Claim, holm, judge,
    least_draws,
)


@dataclasses.dataclass(frozen=True)
class _Provenance:
    n_prompts: int


@dataclasses.dataclass(frozen=True)
class Toy:
    """A result whose statistic is the mean of one value per prompt, with a p-value and draws of its own."""

    values: tuple[float, ...]
    p: float = 0.001
    draws: int | None = None

    @property
    def provenance(self):
        return _Provenance(len(self.values))

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    def resample(self, rng):
        counts = prompt_counts(rng, len(self.values))
        return dataclasses.replace(self, values=tuple(np.repeat(self.values, counts)))


POSITIVE = Claim("toy", "mean above 1", "mean > 1", lambda r: (f"{r.mean:.2f}", r.mean > 1))


def test_holm_matches_a_hand_computation():
    # p sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1 = 0.5); running max keeps 0.06.
    adjusted, factor = holm([0.03, 0.5, 0.01, 0.02])
    assert adjusted.tolist() == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert factor.tolist() == [2, 1, 4, 3]


def test_a_p_value_claim_is_decided_by_its_holm_corrected_p():
    decided = [Claim("toy", f"c{i}", "p < 0.05", lambda r: ("-", True), p_value=lambda r, p=p: (p, None))
               for i, p in enumerate((0.01, 0.03))]
    # Alone each holds; together, 0.03 x 1 = 0.03 and 0.01 x 2 = 0.02: both still hold. With 0.04: 0.04 x 1, 0.01 x 2.
    verdicts = judge([Toy((2.0,) * 6)], claims=[decided], n_bootstrap=0)
    assert [v.verdict for v in verdicts] == [HOLDS, HOLDS]
    assert [v.p_corrected for v in verdicts] == pytest.approx([0.02, 0.03])
    failing = [dataclasses.replace(decided[0], p_value=lambda r: (0.03, None)),
               dataclasses.replace(decided[1], p_value=lambda r: (0.03, None)),
               dataclasses.replace(decided[1], claim="c2", p_value=lambda r: (0.03, None))]
    assert {v.verdict for v in judge([Toy((2.0,) * 6)], claims=[failing], n_bootstrap=0)} == {DOES_NOT_HOLD}


def test_too_few_null_draws_make_a_passing_claim_not_testable_and_say_how_many_are_needed():
    claim = Claim("toy", "beats null", "p < 0.05", lambda r: ("-", True), p_value=lambda r: (1 / (r.draws + 1), r.draws))
    few, = judge([Toy((2.0,) * 6, draws=20)], claims=[[claim]], n_bootstrap=0)
    assert few.verdict == NOT_TESTABLE and f"use at least {least_draws(1)}" in few.note
    enough, = judge([Toy((2.0,) * 6, draws=least_draws(1))], claims=[[claim]], n_bootstrap=0)
    assert enough.verdict == HOLDS
    # A rule that fails on its test fails whatever the draws.
    failing = dataclasses.replace(claim, test=lambda r: ("-", False))
    assert judge([Toy((2.0,) * 6, draws=20)], claims=[[failing]], n_bootstrap=0)[0].verdict == DOES_NOT_HOLD


def test_a_negligible_effect_does_not_hold_however_small_its_p():
    claim = Claim("toy", "excess", "p < 0.05 and effect >= 0.01", lambda r: ("-", True),
                  p_value=lambda r: (1e-6, None), effect=lambda r: r.mean, floor=0.01)
    assert judge([Toy((0.001,) * 6)], claims=[[claim]], n_bootstrap=0)[0].verdict == DOES_NOT_HOLD
    assert judge([Toy((0.5,) * 6)], claims=[[claim]], n_bootstrap=0)[0].verdict == HOLDS


def test_an_undefined_statistic_is_not_testable_never_a_failure():
    from lensdyn.verdicts import finite

    claim = Claim("toy", "fit", "R^2 >= 0.5", lambda r: ("R^2 nan", finite(math.nan >= 0.5, math.nan)))
    v, = judge([Toy((1.0,) * 6)], claims=[[claim]], n_bootstrap=0)
    assert v.verdict == NOT_TESTABLE and "undefined" in v.note


def test_few_prompts_get_a_caveat_and_no_bootstrap():
    v, = judge([Toy((2.0,) * (MIN_PROMPTS - 1))], claims=[[POSITIVE]], n_bootstrap=50)
    assert v.verdict == HOLDS and v.robustness == UNTESTABLE_LABEL and v.bootstrap_share is None
    assert f"fewer than {MIN_PROMPTS}" in v.note


def test_the_bootstrap_share_is_the_share_of_resamples_in_which_the_rule_holds():
    values = (0.2, 0.6, 1.1, 1.4, 1.9, 2.4, 0.9, 1.2)  # mean 1.21: holds, not by much
    v, = judge([Toy(values)], claims=[[POSITIVE]], n_bootstrap=400, seed=3)
    # The same draws, brute force: the generator is used by one resample after another.
    rng = np.random.default_rng(3)
    brute = np.mean([np.mean(np.repeat(values, prompt_counts(rng, len(values)))) > 1 for _ in range(400)])
    assert v.bootstrap_share == pytest.approx(brute)
    assert v.verdict == HOLDS and v.robustness == (ROBUST_LABEL if brute >= 0.95 else FRAGILE_LABEL)
    clear, = judge([Toy((5.0, 6.0, 7.0, 8.0, 5.5, 6.5))], claims=[[POSITIVE]], n_bootstrap=100)
    assert clear.robustness == ROBUST_LABEL and clear.bootstrap_share == 1.0
    never, = judge([Toy((0.1, 0.2, 0.3, 0.2, 0.1, 0.4))], claims=[[POSITIVE]], n_bootstrap=100)
    assert never.verdict == DOES_NOT_HOLD and never.robustness == ROBUST_LABEL and never.bootstrap_share == 0.0


def test_the_reference_column_has_one_value_per_reference():
    v, = judge([Toy((2.0,) * 6)], claims=[[POSITIVE]], references=[[Toy((0.5,) * 6), Toy((3.0,) * 6)]], n_bootstrap=0)
    assert v.reference == "0.50 | 3.00"
