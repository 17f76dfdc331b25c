"""Capture overhead on smollm2-135m, 512 tokens: bare HF forward vs bare bridge forward vs ld.capture.

    python benchmarks/capture.py [--tokens 512] [--repeats 5]

Prints times (best of N) and ratios to the bare Hugging Face forward in the same run.
Target (issue 2): ld.capture of resid + attn_out + mlp_out for all layers <= 1.25x bare HF.
The self-test (hooks.selftest) runs once per model before its first capture; the last column is
each row's share of one capture of the diverse set (the self-test's target: < 5%).
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from lensdyn.app.cli import thread_count  # noqa: E402
import lensdyn as ld  # noqa: E402
from _timing import best_of  # noqa: E402
from lensdyn.hooks.selftest import self_test  # noqa: E402
from lensdyn.models import embedded_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(thread_count())  # OMP_NUM_THREADS, else the CPUs we were given

    bridge = ld.load_model("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(embedded_checkpoint("smollm2-135m"), attn_implementation="eager").eval()
    text = " ".join(ld.get_prompts("diverse").texts * 3)
    ids = bridge.tokenizer(text)["input_ids"]
    tokens = torch.tensor([ids[: args.tokens]])
    assert tokens.shape[1] == args.tokens, "not enough text for the requested length"

    with torch.inference_mode():
        rows = [
            ("bare HF forward (eager attention, logits)", best_of(lambda: hf(tokens), args.repeats)),
            ("bare bridge forward (logits)", best_of(lambda: bridge(tokens), args.repeats)),
        ]
    streams = {
        "ld.capture resid + attn_out + mlp_out": ("resid", "attn_out", "mlp_out"),
        "ld.capture resid only": ("resid",),
        "ld.capture all streams": ld.STREAMS,
    }
    for label, chosen in streams.items():
        rows.append((label, best_of(lambda: ld.capture(bridge, tokens, streams=chosen, exclude=()), args.repeats)))

    diverse = ld.get_prompts("diverse")
    rows.append(("ld.capture the diverse set (9 prompts), all streams",
                 best_of(lambda: ld.capture(bridge, diverse, exclude=()), max(1, args.repeats // 2))))
    rows.append(("self-test (once per model, 16 tokens)", best_of(lambda: self_test(bridge, ids), args.repeats)))

    base, capture_time = rows[0][1], rows[-2][1]
    print(f"smollm2-135m, {args.tokens} tokens, batch 1, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'path':<55} {'time (s)':>9} {'x bare HF':>10} {'/ capture':>10}")
    for label, seconds in rows:
        print(f"{label:<55} {seconds:>9.3f} {seconds / base:>10.2f} {seconds / capture_time:>10.1%}")


if __name__ == "__main__":
    main()
