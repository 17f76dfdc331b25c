"""Shared helpers of the benchmark scripts: their options and thread count, and the timing."""
import argparse
import time


def benchmark_options(doc: str, repeats: int, more=None) -> argparse.Namespace:
    """The options every benchmark takes (``--repeats``, defaulting to ``repeats``), parsed; torch's threads set
    from ``lensdyn.app.cli.thread_count`` (OMP_NUM_THREADS, else the CPUs this process was given).
    ``more(parser)`` adds a benchmark's own options."""
    import torch

    from lensdyn.app.cli import thread_count

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    if more is not None:
        more(parser)
    args = parser.parse_args()
    torch.set_num_threads(thread_count())
    return args


def best_of(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)
