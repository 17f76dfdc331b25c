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


def forward_batches(model, token_lists: list[list[int]], chunk: int, batch_size: int = 8) -> None:
    """Bare forward passes (no hooks) over ``token_lists``, ``chunk`` prompts at a time, in the length-sorted,
    right-padded batches ``capture`` runs them in: the work a capture or a corpus run adds its hooks to."""
    import torch

    from lensdyn.hooks.capture import _length_batches

    device = next(model.parameters()).device
    with torch.inference_mode():
        for begin in range(0, len(token_lists), chunk):
            part = token_lists[begin: begin + chunk]
            for rows in _length_batches([len(t) for t in part], batch_size):
                length = max(len(part[i]) for i in rows)
                batch = torch.zeros(len(rows), length, dtype=torch.long)
                mask = torch.zeros(len(rows), length, dtype=torch.long)
                for j, i in enumerate(rows):
                    batch[j, : len(part[i])], mask[j, : len(part[i])] = torch.tensor(part[i]), 1
                model(batch.to(device), attention_mask=mask.to(device))
