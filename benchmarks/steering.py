"""Steering sweep time against bare forward passes over the same rows, on smollm2-135m.

    python benchmarks/steering.py [--repeats 1]

``steering.measure`` (no control) runs one steered row per extraction, (source, target) pair,
relative norm and evaluation prompt: with the defaults (lensdyn's mean vector alone), 30 native
pairs + 30 transfer pairs, 5 sizes and 6 prompts = 1,800 rows of 6-10 tokens, batched 128 rows
per pass; ``extractions=("mean", "last", "pca")`` is three times the rows. The reference is the bare bridge
forward of exactly those rows (same batches, no hooks): the sweep can not be cheaper than it.
What remains is the contrast and evaluation captures, the hooks, the logit statistics and the
bootstrap.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lensdyn as ld  # noqa: E402
from _timing import benchmark_options, best_of  # noqa: E402
from lensdyn.analyses import steering  # noqa: E402
from lensdyn.analyses.steering import CONTRAST_SETS  # noqa: E402
from lensdyn.prompts import PromptSet  # noqa: E402


def main() -> None:
    args = benchmark_options(__doc__, repeats=1)

    model = ld.load_model("smollm2-135m")
    cap = ld.capture(model, "diverse", streams=steering.STREAMS)
    result = steering.measure(cap, model=model, control=None)
    n_pairs = len(result.layers) + result.transfer.n_pairs - len(set(result.transfer.layers) & set(result.layers))
    evaluation = CONTRAST_SETS[result.contrast].evaluation
    eval_cap = ld.capture(model, PromptSet.from_texts(evaluation), streams=("resid",))
    rows = eval_cap.tokens.repeat(len(result.transfers) * n_pairs * len(result.relative), 1)

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, rows.shape[0], 128):
                model(rows[start:start + 128])

    reference = best_of(bare, args.repeats)
    sweep = best_of(lambda: steering.measure(cap, model=model, control=None), args.repeats)
    every = best_of(lambda: steering.measure(cap, model=model, control=None, extractions=steering.EXTRACTIONS),
                    args.repeats)
    print(f"smollm2-135m, contrast {result.contrast!r}: {len(result.transfers)} extractions x {n_pairs} pairs x "
          f"{len(result.relative)} sizes x "
          f"{len(evaluation)} prompts = {rows.shape[0]} rows of {rows.shape[1]} positions, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'step':<52} {'time (s)':>9} {'x bare':>8}")
    for label, seconds in (("bare forward of the same rows (128 per pass)", reference),
                           ("steering.measure (no control, 200 bootstrap draws)", sweep),
                           ("the same, extractions mean last pca", every)):
        print(f"{label:<52} {seconds:>9.2f} {seconds / reference:>8.2f}")


if __name__ == "__main__":
    main()
