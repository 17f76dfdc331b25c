"""The whole `lensdyn report` against the bare forward passes it replaces, on smollm2-135m.

    python benchmarks/report.py [--repeats 1]

The report runs the default analyses (all but stability and steering, which have their own
forward passes and flags) on the built-in diverse set for the model and its untrained control,
then writes the JSON files and the HTML page. The runs are measured two at a time (two threads with
half of torch's threads each, ``lensdyn.parallel``; per-step times overlap, so they do not add up to
the measure row).
The baseline is one bare forward pass per prompt for each model the report runs (trained weights and
one untrained control per control seed, three by default): what the report's captures replace.
Model loading is timed apart (it is the same for any use of the model).
Targets: report without loading <= 4x the bare forward passes (issue 8); the verdicts' bootstrap
<= 0.5x (issue 18; also printed against the trained model's forward passes alone, the stricter reading).
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lensdyn as ld  # noqa: E402
from _timing import benchmark_options, best_of  # noqa: E402
from lensdyn.app.cli import main as lensdyn_main  # noqa: E402
from lensdyn.app.run import CONTROL_SEEDS  # noqa: E402


def main() -> None:
    args = benchmark_options(__doc__, repeats=1)

    bare, bare_model = 0.0, 0.0
    for weights, seed in (("pretrained", 0), *(("random", s) for s in CONTROL_SEEDS)):
        model = ld.load_model("smollm2-135m", weights=weights, seed=seed)
        cap = ld.capture(model, "diverse", streams=("resid",))
        prompts = [cap.tokens[i: i + 1, : int(cap.token_mask[i].sum())] for i in range(cap.n_prompts)]

        def forward() -> None:
            with torch.inference_mode():
                for ids in prompts:
                    model(ids)

        seconds = best_of(forward, args.repeats)
        bare += seconds
        bare_model = bare_model or seconds

    best = None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            assert lensdyn_main(["report", "--model", "smollm2-135m", "--prompts", "diverse", "--out", out]) == 0
            wall = time.perf_counter() - started
            timings = json.loads((Path(out) / "report.json").read_text())["timings_s"]
        if best is None or wall < best[0]:
            best = (wall, timings)
    wall, timings = best
    phases = timings.pop("wall")
    rows = [(f"bare forward, model + {len(CONTROL_SEEDS)} controls, prompt by prompt", bare)]
    for role, steps in timings.items():
        rows += [(f"{role}: {step.removesuffix('_s')}", seconds) for step, seconds in steps.items() if step != "load_s"]
    rows += [
        ("measure (reference and model side by side)", phases["measure_s"]),
        ("verdicts: Holm and the bootstrap", phases["verdicts_s"]),
        ("JSON + HTML writing", phases["write_s"]),
        ("report without model loading", wall - phases["load_s"]),
        ("model loading (both)", phases["load_s"]),
        ("report, wall clock", wall),
    ]
    print(f"smollm2-135m, diverse set, default analyses + untrained control, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print(f"{'step':<52} {'time (s)':>9} {'x bare':>8}")
    for label, seconds in rows:
        print(f"{label:<52} {seconds:>9.2f} {seconds / bare:>8.2f}")
    print(f"bootstrap against the trained model's bare forward passes alone ({bare_model:.2f} s): "
          f"{phases['verdicts_s'] / bare_model:.2f}x")


if __name__ == "__main__":
    main()
