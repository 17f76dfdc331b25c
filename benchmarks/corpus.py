"""Corpus streaming at 10, 100 and 1,000 prompts: peak memory stays flat, throughput against a bare forward pass.

    python benchmarks/corpus.py [--sizes 10 100 1000] [--chunk 16]
    python benchmarks/corpus.py --memory [--ell 64]       the covariance accumulators' bytes, no model

The memory table: the bytes the covariance accumulator holds, exact (``CovarianceStats``), on a
few chosen states (``--covariance-states``) and as a Frequent Directions sketch
(``--covariance-sketch ELL``), at smollm2's d_model 576 with 31 states and at a synthetic d_model
4096 with 33 states. Every array has a leading state axis, so each row is one state's
accumulator, filled with a small synthetic batch and measured by its arrays' ``nbytes``, times
the states (an exact d_model 4096 accumulator of 33 states would itself take 4.4 GB to measure).
The last line streams synthetic batches through the sketch at d_model 4096 and 33 states and
reports the process's peak resident memory above what it held before.

Each size runs in a fresh process on smollm2-135m. The corpus is built offline from the sentences
of the built-in sets (prompt k joins two different ones: every prompt is distinct, 15-80 tokens long).
Peak memory is the process's peak resident set while streaming, above what it held once the
model was loaded; it follows the largest chunk (in tokens), not the number of prompts (the
kernel's high-water mark is reset after loading: /proc/self/clear_refs).
The bare forward pass runs the same prompts in the same length-sorted batches of 8, without hooks.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))
from _timing import forward_batches  # noqa: E402


def build_corpus(n: int) -> list[str]:
    from lensdyn.prompts import get_prompts

    sentences = list(dict.fromkeys(  # the repeated set repeats its sentences: each one once
        s.strip() + "." for name in ("diverse", "repeated") for text in get_prompts(name).texts
        for s in text.replace("\n", " ").split(". ") if len(s.split()) >= 4))
    m = len(sentences)
    if n > m * (m - 1):
        raise SystemExit(f"at most {m * (m - 1)} distinct prompts from {m} sentences")
    # (i, j) with i = k mod m and j = i + 1 + k // m (mod m): distinct ordered pairs of different sentences.
    return [f"{sentences[k % m]} {sentences[(k % m + 1 + k // m) % m]}" for k in range(n)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def measure_one(n: int, chunk: int) -> dict:
    import torch

    import lensdyn as ld
    from lensdyn.app.cli import thread_count
    from lensdyn.app.corpus import run_corpus

    torch.set_num_threads(thread_count())  # OMP_NUM_THREADS, else the CPUs we were given
    model = ld.load_model("smollm2-135m")
    texts = build_corpus(n)
    ids = [model.tokenizer(t)["input_ids"] for t in texts]
    with torch.inference_mode():  # warm-up, untimed
        model(torch.tensor([ids[0]]))
    started = time.perf_counter()
    forward_batches(model, ids, chunk)
    bare = time.perf_counter() - started
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark: loading's own peak is not the stream's
    baseline = _rss_kib("VmRSS:")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        _, record = run_corpus(model, texts, out, chunk=chunk, progress=False)
        streamed = time.perf_counter() - started
    largest = max(sum(map(len, ids[b: b + chunk])) for b in range(0, n, chunk))  # what peak memory follows
    return {"prompts": n, "tokens": record["n_tokens"], "largest_chunk": largest, "bare_s": bare, "stream_s": streamed,
            "peak_mib": (_rss_kib("VmHWM:") - baseline) / 1024}


def covariance_bytes(d_model: int, n_states: int, ell: int, chosen: int) -> dict[str, int]:
    """Bytes of the covariance accumulator: exact, exact on ``chosen`` states, and a sketch of ``ell`` rows."""
    import torch

    from lensdyn.streaming import CovarianceStats, FrequentDirectionsStats

    batch = torch.randn(1, ell + 1, d_model)  # one state, enough rows to fill the sketch
    exact = CovarianceStats().update(batch).nbytes
    sketch = FrequentDirectionsStats(ell).update(batch).nbytes
    return {"exact": exact * n_states, "chosen": exact * chosen, "sketch": sketch * n_states}


def sketch_peak(d_model: int, n_states: int, ell: int, batches: int, tokens: int) -> dict:
    """Stream ``batches`` synthetic batches of ``tokens`` tokens through the sketch; peak RSS above the start."""
    import torch

    from lensdyn.streaming import FrequentDirectionsStats

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _rss_kib("VmRSS:")
    sketch, gen = FrequentDirectionsStats(ell), torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(batches):
        sketch.update(torch.randn(n_states, tokens, d_model, generator=gen))
    return {"peak_mib": (_rss_kib("VmHWM:") - baseline) / 1024, "held_mib": sketch.nbytes / 2**20,
            "batch_mib": n_states * tokens * d_model * 4 / 2**20, "s": time.perf_counter() - started}


def memory_table(ell: int) -> None:
    print(f"covariance accumulator bytes (float64): exact vs 3 chosen states vs a Frequent Directions sketch of {ell} rows")
    print(f"{'model':>22} {'states':>7} {'d_model':>8} {'exact MB':>10} {'3 states MB':>12} {'sketch MB':>10} {'exact/sketch':>13}")
    for name, d_model, n_states in (("smollm2-135m", 576, 31), ("synthetic", 4096, 33)):
        b = covariance_bytes(d_model, n_states, ell, chosen=3)
        print(f"{name:>22} {n_states:>7} {d_model:>8} {b['exact'] / 1e6:>10.1f} {b['chosen'] / 1e6:>12.1f} "
              f"{b['sketch'] / 1e6:>10.1f} {b['exact'] / b['sketch']:>13.1f}")
    peak = sketch_peak(4096, 33, ell, batches=2, tokens=128)
    print(f"sketch streamed at d_model 4096, 33 states, 2 batches of 128 tokens ({peak['batch_mib']:.0f} MiB float32 "
          f"each): peak {peak['peak_mib']:.0f} MiB above the start, {peak['held_mib']:.0f} MiB held, {peak['s']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help="print the covariance memory table only (no model)")
    parser.add_argument("--ell", type=int, default=64, help="rows per state of the sketch in the memory table")
    args = parser.parse_args()
    if args.memory:
        memory_table(args.ell)
        return
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args.chunk)))
        return
    rows = []
    for n in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--chunk", str(args.chunk)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import torch  # the thread count the children run with (torch's default, as here)

    print(f"smollm2-135m, corpus streaming (chunk {args.chunk} prompts, batches of 8), {torch.get_num_threads()} threads")
    print(f"{'prompts':>8} {'tokens':>8} {'largest chunk':>14} {'peak MiB':>9} {'stream s':>9} {'bare s':>8} {'x bare':>7} "
          f"{'tok/s stream':>13} {'tok/s bare':>11}")
    for r in rows:
        print(f"{r['prompts']:>8} {r['tokens']:>8} {r['largest_chunk']:>14} {r['peak_mib']:>9.0f} {r['stream_s']:>9.2f} "
              f"{r['bare_s']:>8.2f} "
              f"{r['stream_s'] / r['bare_s']:>7.2f} {r['tokens'] / r['stream_s']:>13.0f} {r['tokens'] / r['bare_s']:>11.0f}")


if __name__ == "__main__":
    main()
