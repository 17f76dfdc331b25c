"""Model load times: smollm2-135m from GGUF (dequantise + write cache) vs from the cache; minilm-l6.

    python benchmarks/load.py

Uses a fresh temporary cache directory, so it measures the first-ever load honestly.
"""
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _timing import best_of  # noqa: E402


def timed(fn) -> float:
    """One cold run: a load is measured once, its first time counts."""
    return best_of(fn, repeats=1, warmup=0)


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LENSDYN_CACHE"] = cache
        import lensdyn as ld

        rows = [
            ("smollm2-135m, first load (dequantise GGUF, write cache)", timed(lambda: ld.load_model("smollm2-135m"))),
            ("smollm2-135m, cached load", timed(lambda: ld.load_model("smollm2-135m"))),
            ("smollm2-135m, random weights (cached config)", timed(lambda: ld.load_model("smollm2-135m", weights="random"))),
            ("minilm-l6", timed(lambda: ld.load_model("minilm-l6"))),
        ]
    print(f"{'load':<58} {'time (s)':>9}")
    for label, seconds in rows:
        print(f"{label:<58} {seconds:>9.2f}")


if __name__ == "__main__":
    main()
