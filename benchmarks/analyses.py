"""Analysis time against the forward pass it reads, on smollm2-135m and the built-in diverse set.

    python benchmarks/analyses.py [--repeats 3]

Forward pass = ld.capture of the streams the analyses need (the capture is the forward pass
plus the copies). Each analysis is timed on that capture, without the untrained control
(whose own forward pass is a second run, not analysis). The causal metric is a per-model
constant (one [vocab, d_model] covariance) and is timed on its own line.
Target (issue 3): expansion and gains, excluding the forward pass, each <= 0.5x the forward pass.
Target (issue 4): the per-prompt metastability analysis of one 512-token prompt (31 states,
without attention graphs) <= 2x that prompt's forward pass. The V/OV spectra are a per-model
constant (cached) and timed on their own line.
Curvature is timed on the same capture: its nulls, plus its own forward passes over the 14
built-in edit pairs (one capture of their prompts, one batched patch sweep); target <= 4 s on
2 threads, about one bare forward pass of the diverse set.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lensdyn as ld  # noqa: E402
from _timing import benchmark_options, best_of  # noqa: E402
from lensdyn.analyses import curvature, expansion, gains  # noqa: E402
from lensdyn.analyses import metastability as ms  # noqa: E402
from lensdyn.hooks.circuits import _circuit_spectra, unembedding  # noqa: E402
from lensdyn.metric import causal_metric  # noqa: E402


def main() -> None:
    args = benchmark_options(__doc__, repeats=3)

    model = ld.load_model("smollm2-135m")
    streams = tuple(sorted(set(expansion.STREAMS) | set(gains.STREAMS) | set(curvature.STREAMS)))
    cap = ld.capture(model, "diverse", streams=streams)
    forward = best_of(lambda: ld.capture(model, "diverse", streams=streams), args.repeats)
    prompts = [cap.tokens[i : i + 1, : int(cap.token_mask[i].sum())] for i in range(cap.n_prompts)]
    bare = best_of(lambda: [model(ids) for ids in prompts], args.repeats)
    rows = [
        ("bare bridge forward, prompt by prompt (logits)", bare),
        (f"ld.capture {', '.join(streams)}", forward),
        ("causal metric from W_U (once per model)", best_of(lambda: causal_metric(unembedding(model)), args.repeats)),
        ("expansion.measure (100 permutations)",
         best_of(lambda: expansion.measure(cap, model=model, control=None), args.repeats)),
        ("gains.measure", best_of(lambda: gains.measure(cap, control=None), args.repeats)),
        ("curvature.measure (2 nulls x 20 draws, 14 edit pairs)",
         best_of(lambda: curvature.measure(cap, model=model, control=None), args.repeats)),
    ]
    print(f"smollm2-135m, diverse set: {cap.n_prompts} prompts, {int(cap.token_mask.sum())} tokens, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    _table(rows, forward, "x capture")

    text = " ".join(ld.get_prompts("diverse").texts * 3)
    long_prompt = [model.tokenizer(text)["input_ids"][:512]]
    one = ld.capture(model, long_prompt, streams=ms.STREAMS)
    forward_one = best_of(lambda: ld.capture(model, long_prompt, streams=ms.STREAMS), args.repeats)
    ms.measure(one, model=model, control=None, repeated=False)  # caches the spectra
    rows = [
        ("bare bridge forward (logits)", best_of(lambda: model(torch.tensor(long_prompt)), args.repeats)),
        ("ld.capture resid", forward_one),
        ("V / OV spectra (once per model, cached)", best_of(lambda: _circuit_spectra(model), 1)),
        ("metastability.measure, no attention graphs",
         best_of(lambda: ms.measure(one, model=model, control=None, repeated=False), args.repeats)),
    ]
    print(f"\nsmollm2-135m, one prompt of 512 tokens, 31 states, best of {args.repeats}")
    _table(rows, forward_one, "x capture")


def _table(rows, base: float, unit: str) -> None:
    print(f"{'step':<60} {'time (s)':>9} {unit:>10}")
    for label, seconds in rows:
        print(f"{label:<60} {seconds:>9.3f} {seconds / base:>10.2f}")


if __name__ == "__main__":
    main()
