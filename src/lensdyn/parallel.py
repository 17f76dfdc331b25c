"""Two measurements side by side: the report's runs (a model and its controls) in two threads.

A measurement alternates matrix work (torch, on every core it is given) with single-threaded steps
(HDBSCAN, numpy histograms, Python bookkeeping). Two of them in two threads overlap one's
single-threaded steps with the other's matrix work, each with half of torch's threads: two runs
each asking for every core oversubscribe them (the report on 2 cores: 63 s so, 54 s with one thread
a run). With a single torch thread there is nothing to split and the calls run one after the other;
a call made from inside a side-by-side run does too (torch's thread count is process-wide).
Floating-point sums may run in another order on fewer threads: results agree to round-off
(~1e-8 relative on the report), every count and verdict equal. A single ``measure()`` with its
control gains nothing from it (measured: metastability, expansion and the lens on the diverse set,
within noise either way) and would hold two runs' pairwise matrices at once, so it measures the
control after the model.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
_LOCK = threading.Lock()
_ACTIVE = [False]


def side_by_side(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Every ``call()``, two at a time in threads with half of torch's threads each (module docstring); their
    results in order. The first exception raised is raised here.

    >>> side_by_side([lambda: 1, lambda: 2, lambda: 3])
    [1, 2, 3]
    """
    import torch

    threads = torch.get_num_threads()
    with _LOCK:
        nested, _ACTIVE[0] = _ACTIVE[0], True
    if nested or threads < 2 or len(calls) < 2:
        try:
            return [call() for call in calls]
        finally:
            if not nested:
                _ACTIVE[0] = False
    torch.set_num_threads(threads // 2)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda call: call(), calls))
    finally:
        torch.set_num_threads(threads)
        _ACTIVE[0] = False
