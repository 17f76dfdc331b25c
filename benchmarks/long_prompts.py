"""Long prompts: seconds and peak memory of one prompt of 512 / 2,048 / 4,096 / 8,192 tokens, smollm2-135m.

    python benchmarks/long_prompts.py [--lengths 512,2048,4096,8192] [--budget 600] [--curvature]

The prompt is built by tokens: every text of the built-in ``varied`` and ``diverse`` sets, joined by
blank lines and tokenised by SmolLM2's tokenizer (no BOS, 5,973 tokens), repeated from its start
until it holds exactly the row's length (8,192 is SmolLM2's context). Each row runs in a fresh
process, so its peak is its own: ``metastability.measure(model, [ids], control="random")`` (the
model, its untrained control and the ``repeated`` diagnostic, as ``lensdyn metastability`` runs it),
and with ``--curvature`` ``curvature.measure`` on the same prompt with its control. Seconds: the
measure call, model loading excluded; peak: the process's maximum resident set
(``getrusage(RUSAGE_SELF).ru_maxrss``), model loading included. Rows stop once ``--budget``
seconds are spent (this machine is shared); a row not run says so.
Target (issue 20, item 4): one 4,096-token prompt with the control in at most 60 s and 4 GB.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))
from _timing import benchmark_options  # noqa: E402

SETS = ("varied", "diverse")


def prompt_ids(model, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids: the built-in texts (module docstring) tokenised once, repeated from the start."""
    import lensdyn as ld

    text = "\n\n".join(t for name in SETS for t in ld.get_prompts(name).texts)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def one_row(analysis: str, n_tokens: int) -> dict:
    """Measure one analysis on one prompt of ``n_tokens`` tokens in this process: seconds and peak RSS."""
    import lensdyn as ld
    from lensdyn.analyses import curvature, metastability

    model = ld.load_model("smollm2-135m")
    ids = prompt_ids(model, n_tokens)
    started = time.perf_counter()
    if analysis == "metastability":
        result = metastability.measure(model, [ids], control="random")
        clustered = getattr(result.prompts[0], "clustered_tokens", None)  # None: lensdyn before the subsample rule
        note = f"HDBSCAN on {clustered or n_tokens - 1} tokens"  # position 0 is excluded
    else:
        curvature.measure(model, [ids], control="random")
        note = ""
    seconds = time.perf_counter() - started
    return dict(seconds=seconds, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, note=note)


def main() -> None:
    def more(parser):
        parser.add_argument("--lengths", default="512,2048,4096,8192")
        parser.add_argument("--budget", type=float, default=600.0, help="seconds for all rows together")
        parser.add_argument("--curvature", action="store_true", help="also curvature.measure on each prompt")
        parser.add_argument("--row", nargs=2, metavar=("ANALYSIS", "TOKENS"), help=argparse.SUPPRESS)

    args = benchmark_options(__doc__, repeats=1, more=more)
    if args.row:
        print(json.dumps(one_row(args.row[0], int(args.row[1]))))
        return
    import torch

    analyses = ("metastability", "curvature") if args.curvature else ("metastability",)
    deadline = time.monotonic() + args.budget
    print(f"smollm2-135m, one prompt per row, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"{'analysis':<14} {'tokens':>6} {'seconds':>8} {'peak GB':>8}  note")
    for n_tokens in (int(n) for n in args.lengths.split(",")):
        for analysis in analyses:
            left = deadline - time.monotonic()
            row = None
            if left > 5:
                try:
                    out = subprocess.run([sys.executable, __file__, "--row", analysis, str(n_tokens)], check=True,
                                         capture_output=True, text=True, timeout=left).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                except subprocess.TimeoutExpired:
                    pass
                except subprocess.CalledProcessError as error:
                    sys.exit(f"{analysis} on {n_tokens} tokens failed:\n{error.stderr[-2000:]}")
            if row is None:
                why = "stopped at" if left > 5 else "not run: past"
                print(f"{analysis:<14} {n_tokens:>6} {'-':>8} {'-':>8}  {why} the {args.budget:g} s budget")
            else:
                print(f"{analysis:<14} {n_tokens:>6} {row['seconds']:>8.1f} {row['peak_gb']:>8.2f}  {row['note']}",
                      flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
