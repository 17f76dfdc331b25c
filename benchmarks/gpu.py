"""lensdyn on a CUDA device against the bare forward passes on the same tokens, on smollm2-135m.

    python benchmarks/gpu.py [--repeats 3] [--prompts 64] [--device cuda:1]

Three rows, each a ratio to the bare forward passes it replaces and with its peak GPU memory
(``torch.cuda.max_memory_allocated``, reset before each row; the weights of the models in use included):

- capture: ``ld.capture`` of every stream of the diverse set, kept on the device (``store_device="auto"``),
  against one bare forward pass per length-sorted batch of 8, without hooks;
- report: ``lensdyn report --device cuda`` (default analyses, the model and its untrained controls;
  loading excluded, as in benchmarks/report.py) against one bare forward pass per prompt for each model;
- corpus: ``run_corpus`` over ``--prompts`` distinct prompts (benchmarks/corpus.py's corpus), chunks of 16,
  each reduced on the device, against the same prompts in the same batches without hooks.

Every timed span starts and ends with ``torch.cuda.synchronize()``: CUDA calls return before the device
is done. Without a CUDA device the script says so in one line and exits 0.
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
from _timing import benchmark_options, best_of, forward_batches  # noqa: E402

MODEL = "smollm2-135m"


def synchronized(fn):
    """``fn`` bracketed by device synchronisation, so that a wall-clock timing covers the device's work."""
    def run():
        torch.cuda.synchronize()
        fn()
        torch.cuda.synchronize()
    return run


def peak_gib(fn) -> float:
    """Peak GPU memory allocated while ``fn()`` runs (GiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def report_seconds(out: str, device: str) -> float:
    """``lensdyn report --device cuda``, wall clock less its model loading (the report's own ``load_s``)."""
    from lensdyn.app.cli import main as lensdyn_main

    torch.cuda.synchronize()
    started = time.perf_counter()
    assert lensdyn_main(["report", "--model", MODEL, "--prompts", "diverse", "--device", device, "--out", out]) == 0
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return wall - json.loads((Path(out) / "report.json").read_text())["timings_s"]["wall"]["load_s"]


def main() -> None:
    import argparse

    if not torch.cuda.is_available():
        print("no CUDA device on this machine: benchmarks/gpu.py measures nothing here")
        return
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--prompts", type=int, default=64)
    extra.add_argument("--device", default="cuda")
    known, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = benchmark_options(__doc__, repeats=3)

    import lensdyn as ld
    from corpus import build_corpus
    from lensdyn.app.corpus import run_corpus
    from lensdyn.app.run import CONTROL_SEEDS

    model = ld.load_model(MODEL, device=known.device)
    diverse = ld.get_prompts("diverse")
    diverse_ids = [model.tokenizer(t)["input_ids"] for t in diverse.texts]
    texts = build_corpus(known.prompts)
    corpus_ids = [model.tokenizer(t)["input_ids"] for t in texts]
    rows = []

    bare_capture = best_of(synchronized(lambda: forward_batches(model, diverse_ids, len(diverse_ids))), args.repeats)
    capture = synchronized(lambda: ld.capture(model, diverse))
    rows.append(("capture, every stream, diverse set", best_of(capture, args.repeats), bare_capture, peak_gib(capture)))

    bare_corpus = best_of(synchronized(lambda: forward_batches(model, corpus_ids, 16)), args.repeats)

    def stream() -> None:
        with tempfile.TemporaryDirectory() as out:
            run_corpus(model, ld.PromptSet.from_texts(texts, name="benchmark"), out, chunk=16, progress=False)

    corpus_seconds = best_of(synchronized(stream), args.repeats)
    rows.append((f"corpus streaming, {known.prompts} prompts, chunks of 16", corpus_seconds, bare_corpus, peak_gib(stream)))

    bare_report = 0.0
    for weights, seed in (("pretrained", 0), *(("random", s) for s in CONTROL_SEEDS)):
        twin = model if weights == "pretrained" else ld.load_model(MODEL, weights=weights, seed=seed, device=known.device)
        bare_report += best_of(synchronized(lambda: [forward_batches(twin, [ids], 1) for ids in diverse_ids]),
                               args.repeats)
        del twin
    del model  # the report loads its own: its peak memory is its models' and captures', not this one's too
    torch.cuda.empty_cache()
    times, peaks = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            peaks.append(peak_gib(lambda: times.append(report_seconds(out, known.device))))
    rows.append((f"report, default analyses + {len(CONTROL_SEEDS)} controls", min(times), bare_report, max(peaks)))

    print(f"{MODEL} on {torch.cuda.get_device_name(known.device)}, best of {args.repeats}")
    print(f"{'step':<48} {'time (s)':>9} {'bare (s)':>9} {'x bare':>7} {'peak GiB':>9}")
    for label, seconds, bare, peak in rows:
        print(f"{label:<48} {seconds:>9.3f} {bare:>9.3f} {seconds / bare:>7.2f} {peak:>9.2f}")
    print(f"corpus throughput: {bare_corpus / corpus_seconds:.0%} of the bare forward pass")


if __name__ == "__main__":
    main()
