"""The lens against the capture it reads, on smollm2-135m and the built-in diverse set.

    python benchmarks/lens.py [--repeats 1]

Times (best of ``--repeats``): a bare forward pass prompt by prompt, ``ld.capture`` of ``resid``
(the forward pass the lens reads), ``lens.measure`` on that capture without the control as the
report runs it (``lens_tokens=256`` drawn tokens, every state through the final norm and the
49,152-way unembedding) and on every included token (``lens_tokens=0``), and the affine lens's fit
alone (streamed moments and 31 ridge solves) and with its held-out decoding. Each is printed as a
ratio to the capture. Every decoded token costs ``n_layers`` unembeddings (the unembedding is a
fifth of SmolLM2's parameters), hence the subsample; the largest difference per statistic between
the subsample's means and every token's is printed too. The peak resident memory is read before
and after the lens (``ru_maxrss``). Then the lens's numbers at a few states, with the untrained
control's and the affine lens's.
"""
import os
import resource
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lensdyn as ld  # noqa: E402
from _timing import benchmark_options, best_of  # noqa: E402
from lensdyn.analyses import lens  # noqa: E402

STATES = (0, 10, 20, 29, 30)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    args = benchmark_options(__doc__, repeats=1)

    model = ld.load_model("smollm2-135m")
    cap = ld.capture(model, "diverse", streams=lens.STREAMS)
    prompts = [cap.tokens[i: i + 1, :n] for i, n in enumerate(cap.lengths)]
    with torch.inference_mode():
        bare = best_of(lambda: [model(ids) for ids in prompts], args.repeats)
    forward = best_of(lambda: ld.capture(model, "diverse", streams=lens.STREAMS), args.repeats)
    before = peak_mb()
    timed = best_of(lambda: lens.measure(cap, model=model, control=None), args.repeats, warmup=0)
    after = peak_mb()
    every = best_of(lambda: lens.measure(cap, model=model, control=None, lens_tokens=0), args.repeats, warmup=0)
    train = cap.mask.clone()
    train[1::2] = False
    fit = best_of(lambda: lens.fit_affine(cap.tokens_of("resid", train), lens.RIDGE), args.repeats)
    affine = best_of(lambda: lens.measure(cap, model=model, control=None, affine_lens=True), args.repeats, warmup=0)
    rows = [
        ("bare bridge forward, prompt by prompt (logits)", bare),
        ("ld.capture resid", forward),
        (f"lens.measure (31 states x {lens.LENS_TOKENS} drawn tokens: the report's)", timed),
        ("lens.measure, lens_tokens=0 (31 states x every included token)", every),
        ("affine lens fit alone (moments + 31 ridge solves)", fit),
        ("lens.measure with --affine-lens (fit + held-out decoding)", affine),
    ]
    print(f"smollm2-135m, diverse set: {cap.n_prompts} prompts, {int(cap.token_mask.sum())} tokens "
          f"({cap.n_tokens} included), {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'step':<60} {'time (s)':>9} {'x capture':>10} {'x bare':>8}")
    for label, seconds in rows:
        print(f"{label:<60} {seconds:>9.3f} {seconds / forward:>10.2f} {seconds / bare:>8.2f}")
    print(f"peak resident memory: {before:.0f} MB before the lens, {after:.0f} MB after (+{after - before:.0f} MB)")
    drawn, full = lens.measure(cap, model=model, control=None), lens.measure(cap, model=model, control=None, lens_tokens=0)
    for name in ("kl", "entropy", "top1", "log_rank"):
        gap = np.abs(getattr(drawn, name) - getattr(full, name))
        print(f"{name}: {lens.LENS_TOKENS} drawn tokens vs every token, largest difference over states {gap.max():.4f} "
              f"(state {int(gap.argmax())}, where every token gives {getattr(full, name)[gap.argmax()]:.4f})")

    result = lens.measure(cap, model=model, affine_lens=True)
    c, a = result.control, result.affine
    print(f"\n{'state':>5} {'KL':>8} {'top1':>6} {'mean rank':>10} {'geo rank':>9} {'entropy':>8} | control {'KL':>7} "
          f"{'top1':>6} {'geo rank':>9} {'entropy':>8} | affine {'KL':>7} {'logit KL':>8} {'top1':>6} {'R^2':>7}")
    for l in STATES:
        print(f"{l:>5} {result.kl[l]:>8.3f} {result.top1[l]:>6.3f} {result.rank[l]:>10.1f} {np.expm1(result.log_rank[l]):>9.1f} "
              f"{result.entropy[l]:>8.3f} |         {c.kl[l]:>7.3f} {c.top1[l]:>6.3f} {np.expm1(c.log_rank[l]):>9.1f} "
              f"{c.entropy[l]:>8.3f} |        {a.kl[l]:>7.3f} {a.logit_kl[l]:>8.3f} {a.top1[l]:>6.3f} {a.r2[l]:>7.3f}")
    print(f"control's affine lens: KL {np.round(c.affine.kl[list(STATES)], 3)}, R^2 {np.round(c.affine.r2[list(STATES)], 3)}")
    for v in result.verdicts():
        print(f"{v.claim}: {v.verdict} ({v.measured}); {v.robustness_text}")
    print(result.summary())


if __name__ == "__main__":
    main()
