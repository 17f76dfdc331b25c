"""Write-up claims, judged on a measured result by rules written in code, never typed by hand.

A ``Claim`` names its write-up, states the claim and the rule, and carries a ``test``: a function
of a result that returns what was measured (text) and whether the rule holds (True / False, or
None when this result cannot test it). ``judge(result, claims)`` runs every test on the result and
on its reference (``result.control``: the untrained control, or a second model under
``--compare``) and returns one ``Verdict`` per claim; the verdict is the result's own.

>>> claim = Claim("toy write-up", "norms grow", "a(L) > 1", lambda r: (f"a(L) = {r}", r > 1))
>>> judge(3.0, [claim])[0].verdict
'holds'
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

HOLDS, DOES_NOT_HOLD, NOT_TESTABLE = "holds", "does not hold", "not testable here"


@dataclass(frozen=True)
class Claim:
    """One claim of one write-up, with the rule that decides it on a measured result."""

    source: str  # the write-up
    claim: str
    rule: str
    test: Callable[[object], tuple[str, bool | None]]  # result -> (measured, holds?)


@dataclass(frozen=True)
class Verdict:
    """A claim judged on one model: the measured value, the reference's value, and the verdict."""

    source: str
    claim: str
    rule: str
    measured: str
    reference: str  # the same measurement on result.control ("-" when there is none)
    verdict: str  # HOLDS, DOES_NOT_HOLD or NOT_TESTABLE


def judge(result, claims: Sequence[Claim]) -> list[Verdict]:
    """Every claim's test on ``result`` and on its reference (``result.control``, when present)."""
    reference = getattr(result, "control", None)
    out = []
    for claim in claims:
        measured, holds = claim.test(result)
        out.append(Verdict(
            source=claim.source,
            claim=claim.claim,
            rule=claim.rule,
            measured=measured,
            reference="-" if reference is None else claim.test(reference)[0],
            verdict=NOT_TESTABLE if holds is None else HOLDS if bool(holds) else DOES_NOT_HOLD,
        ))
    return out


def verdict_table(verdicts: Sequence[Verdict], reference_label: str = "control") -> str:
    """A fixed-width text table of verdicts (the summary's text form).

    >>> print(verdict_table([Verdict("w", "c", "r", "1.0", "0.5", HOLDS)]))
    claim  measured  control  verdict
    c      1.0       0.5      holds
    """
    rows = [("claim", "measured", reference_label, "verdict")] + [(v.claim, v.measured, v.reference, v.verdict) for v in verdicts]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
