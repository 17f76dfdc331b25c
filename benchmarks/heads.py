"""Per-head capture vs plain capture on smollm2-135m (30 blocks, 9 query heads, 3 KV heads), the diverse set.

    python benchmarks/heads.py [--repeats 3]

Prints times (best of N) and ratios to a bare Hugging Face forward of the same prompts (one at a
time, eager attention) and to the plain capture of the streams the per-head analysis reads. The
per-head reduction (``lensdyn.hooks.heads``) rides on the capture's pass; ``heads.measure`` given the
report's shared capture runs it again, and once more for the untrained control.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lensdyn as ld  # noqa: E402
from _timing import benchmark_options, best_of  # noqa: E402
from lensdyn.analyses import heads  # noqa: E402
from lensdyn.hooks.heads import head_capture  # noqa: E402
from lensdyn.models import embedded_checkpoint  # noqa: E402


def main() -> None:
    args = benchmark_options(__doc__, repeats=3)

    bridge = ld.load_model("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(embedded_checkpoint("smollm2-135m"), attn_implementation="eager").eval()
    diverse = ld.get_prompts("diverse")
    ids = [torch.tensor([bridge.tokenizer(text)["input_ids"]]) for text in diverse.texts]

    def bare_hf():
        with torch.inference_mode():
            for tokens in ids:
                hf(tokens)

    cap = ld.capture(bridge, diverse, streams=heads.STREAMS)
    rows = [
        ("bare HF forward, one prompt at a time (logits)", best_of(bare_hf, args.repeats)),
        ("ld.capture resid + attn_in + attn_out", best_of(lambda: ld.capture(bridge, diverse, streams=heads.STREAMS),
                                                          args.repeats)),
        ("head_capture, same streams + per-head reduction", best_of(lambda: head_capture(bridge, diverse),
                                                                    args.repeats)),
        ("head_capture, + full writes of 3 blocks", best_of(lambda: head_capture(bridge, diverse, keep=(0, 14, 29)),
                                                            args.repeats)),
        ("heads.measure(capture), no control", best_of(lambda: heads.measure(cap, model=bridge, control=None),
                                                       args.repeats)),
        ("heads.measure(capture), with the random control", best_of(lambda: heads.measure(cap, model=bridge),
                                                                    max(1, args.repeats // 2))),
    ]
    base, plain = rows[0][1], rows[1][1]
    print(f"smollm2-135m, diverse set ({cap.n_prompts} prompts, {int(cap.token_mask.sum())} tokens), "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'path':<55} {'time (s)':>9} {'x bare HF':>10} {'x capture':>10}")
    for label, seconds in rows:
        print(f"{label:<55} {seconds:>9.3f} {seconds / base:>10.2f} {seconds / plain:>10.2f}")


if __name__ == "__main__":
    main()
