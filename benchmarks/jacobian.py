"""Leading Jacobian eigenvalues of one block at one position against that block's forward pass.

    python benchmarks/jacobian.py [--context 512] [--layer 2] [--repeats 3]

Target (issue 6): the leading 6 eigenvalues of one smollm2-135m block at one position with 512
tokens of context in under 30x the time of that block's forward pass on the same 512 tokens.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lensdyn as ld  # noqa: E402
from _timing import best_of  # noqa: E402
from lensdyn.app.cli import thread_count  # noqa: E402
from lensdyn.hooks.iterate import block_inputs  # noqa: E402
from lensdyn.hooks.jacobian import jacobian_spectrum  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(thread_count())  # OMP_NUM_THREADS, else the CPUs we were given

    model = ld.load_model("smollm2-135m")
    text = " ".join(ld.get_prompts("diverse").texts * 3)
    ids = [model.tokenizer(text)["input_ids"][: args.context]]
    cap = ld.capture(model, ids, streams=("resid",), exclude=())
    states = cap.resid[args.layer, 0]
    x = states[None]
    block_args, block_kwargs = block_inputs(model, args.layer, x.shape[1])
    with torch.inference_mode():  # the block's own forward pass over all 512 positions
        forward = best_of(lambda: model.blocks[args.layer](x, *block_args, **block_kwargs), args.repeats)
    rows = [(f"block {args.layer} forward, {args.context} tokens", forward, None)]
    for mode in ("context", "single-token"):
        spectrum = jacobian_spectrum(model, states, args.layer, -1, mode, k=6, sigma=False)
        seconds = best_of(lambda mode=mode: jacobian_spectrum(model, states, args.layer, -1, mode, k=6, sigma=False), 1)
        label = f"leading 6 eigenvalues, {mode} ({spectrum.matvecs} jvps, rho {spectrum.spectral_radius:.4g})"
        rows.append((label, seconds, None))
    print(f"smollm2-135m, block {args.layer}, last of {args.context} tokens, {torch.get_num_threads()} threads")
    print(f"{'step':<70} {'time (s)':>9} {'x block fwd':>12}")
    for label, seconds, _ in rows:
        print(f"{label:<70} {seconds:>9.3f} {seconds / forward:>12.1f}")


if __name__ == "__main__":
    main()
