"""Fast paths that check themselves against their reference path, and say so when they fail.

Wherever lensdyn computes something a faster way than the plain path (the patch sweep's prefix
key/value cache, the Jacobian's precomputed context keys and values), the fast path depends on
library internals that change under it: transformers 5.24 renamed the cache keyword an attention
module receives, and the prefix cache silently held no tokens. So a fast path is never trusted:

- the first use per model compares one row (or one product) against the reference path;
- on a disagreement it falls back to the reference path with one ``FastPathWarning`` that names
  the fast path and the size of the disagreement, and stays off for that model;
- ``fast_paths(model)`` tells which fast paths were checked, taken, or found broken, so a test
  can insist that a fast path is actually taken (a silent fallback is a speed bug).

>>> import torch
>>> model = torch.nn.Linear(2, 2)
>>> agrees(model, "doubling", torch.tensor([2.0, 4.0]), torch.tensor([2.0, 4.0]))
True
>>> fast_paths(model)["doubling"].taken
True
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor


class FastPathWarning(RuntimeWarning):
    """A fast path disagreed with its reference path; lensdyn fell back to the reference."""


@dataclass(frozen=True)
class FastPathRecord:
    """What the check found: ``taken`` (agreed, in use), else broken or unavailable, and why."""

    name: str
    taken: bool
    disagreement: float  # max |fast - reference| / max(1, max |reference|); nan where unavailable
    reason: str = ""


_RECORDS: "weakref.WeakKeyDictionary[object, dict[str, FastPathRecord]]" = weakref.WeakKeyDictionary()


def fast_paths(model) -> dict[str, FastPathRecord]:
    """Every fast path checked on ``model`` so far, by name."""
    return dict(_RECORDS.get(model, {}))


def verdict(model, name: str) -> bool | None:
    """True if ``name`` was checked and taken on ``model``, False if found broken or unavailable, None if unchecked."""
    record = _RECORDS.get(model, {}).get(name)
    return None if record is None else record.taken


def disagreement(fast: Tensor, reference: Tensor) -> float:
    """``max |fast - reference| / max(1, max |reference|)``: relative to the values' scale, absolute near zero.

    >>> disagreement(torch.tensor([10.0, 0.0]), torch.tensor([10.0, 0.5]))
    0.05
    """
    fast, reference = fast.detach().double().cpu(), reference.detach().double().cpu()
    if fast.shape != reference.shape:
        return float("inf")
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return float((fast - reference).abs().max()) / scale if reference.numel() else 0.0


def agrees(model, name: str, fast: Tensor, reference: Tensor, tolerance: float = 1e-3) -> bool:
    """Compare a fast path's output with the reference path's, record it, warn on a disagreement.

    ``tolerance`` bounds ``disagreement(fast, reference)``; float32 round-off between two exact
    paths is about 1e-6, a broken cache gives order one.
    """
    gap = disagreement(fast, reference)
    ok = bool(gap <= tolerance)
    _record(model, FastPathRecord(name, ok, gap, "" if ok else f"disagreement {gap:.3g} > {tolerance:g}"))
    if not ok:
        warnings.warn(
            f"lensdyn: fast path '{name}' disagrees with the reference path by {gap:.3g} (relative, tolerance "
            f"{tolerance:g}); using the reference path for this model (slower, right)",
            FastPathWarning, stacklevel=3,
        )
    return ok


def unavailable(model, name: str, reason: str, warn: bool) -> None:
    """Record that a fast path could not be built; ``warn`` where it should have been (a speed bug, said once)."""
    first = _RECORDS.get(model, {}).get(name) is None
    _record(model, FastPathRecord(name, False, float("nan"), reason))
    if warn and first:
        warnings.warn(f"lensdyn: fast path '{name}' is unavailable ({reason}); using the reference path (slower, right)",
                      FastPathWarning, stacklevel=3)


def _record(model, record: FastPathRecord) -> None:
    try:
        _RECORDS.setdefault(model, {})[record.name] = record
    except TypeError:  # an object that cannot be weakly referenced: nothing to remember it by
        pass
