"""Corpus streaming: shards merge into the single run, a stopped run resumes, mismatches are refused."""
import importlib
import json

import numpy as np
import pytest
import torch

import lensdyn as ld
from lensdyn.cli import main
from lensdyn.corpus import corpus_result, merge_shards, parse_shard, run_corpus
from lensdyn.errors import ArgumentError
from lensdyn.results import load_result

CORPUS = [
    "The river rose overnight and the bridge was closed.",
    "Prices of copper fell for the third week in a row.",
    "She tuned the violin, then played the opening bars again.",
    "def add(a, b):\n    return a + b",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The committee postponed its vote until the spring.",
    "Seven ravens sat on the old stone wall.",
]
FIELDS = ("mean_norm", "std_norm", "scale_factor", "scale_factor_mean_of_ratios", "hubble_rate", "causal_scale_factor",
          "attn_gain", "mlp_gain", "participation_ratio", "top_eigenvalues", "histogram", "energy")


def assert_same_statistics(a, b):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        # float64 round-off at the scale of each statistic (entries near zero carry their neighbours' error)
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * np.abs(x).max(), err_msg=name)
    assert a.provenance.n_tokens == b.provenance.n_tokens and a.provenance.n_prompts == b.provenance.n_prompts


@pytest.fixture(scope="module")
def single(smollm2, tmp_path_factory):
    return run_corpus(smollm2, CORPUS, tmp_path_factory.mktemp("single"), chunk=3, batch_size=1, progress=False)


def test_merged_shards_equal_the_single_run(smollm2, single, tmp_path):
    for i in range(3):
        # One prompt per forward pass: the same activations in any shard (batching changes them by ~1e-7).
        run_corpus(smollm2, CORPUS, tmp_path, shard=(i, 3), chunk=2, batch_size=1, progress=False)
    merged = corpus_result(*merge_shards(sorted(tmp_path.glob("shard-*.json"))))
    reference = corpus_result(*single)
    assert_same_statistics(merged, reference)
    assert merged.n_shards == 3 and reference.provenance.n_prompts == len(CORPUS)
    # And against the analyses on one capture of the whole corpus (the direct, non-streaming path).
    cap = ld.capture(smollm2, CORPUS, streams=("resid",), batch_size=1)
    from lensdyn.analyses.expansion import scale_factor
    from lensdyn.ops import token_norms

    np.testing.assert_allclose(reference.scale_factor, scale_factor(token_norms(cap.tokens_of("resid"))), rtol=1e-12)
    assert reference.provenance.n_tokens == cap.n_tokens


def test_a_stopped_run_resumes_and_counts_each_chunk_once(smollm2, single, tmp_path, monkeypatch):
    capture_module = importlib.import_module("lensdyn.hooks.capture")  # lensdyn.hooks.capture is also the function
    real_capture, calls = capture_module.capture, []

    def failing_capture(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped by the user (or the scheduler) in the middle of the second chunk
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(capture_module, "capture", failing_capture)
    with pytest.raises(KeyboardInterrupt):
        run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False)
    record = json.loads((tmp_path / "shard-0-of-1.json").read_text())
    assert record["prompts_done"] == 3
    monkeypatch.setattr(capture_module, "capture", real_capture)
    stats, record = run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False)
    assert record["prompts_done"] == len(CORPUS)
    assert_same_statistics(corpus_result(stats, record), corpus_result(*single))
    assert [p.name for p in tmp_path.glob("*.npz")] == [record["stats_file"]]  # superseded checkpoints are gone


def test_mismatched_incomplete_and_missing_shards_are_refused(smollm2, tmp_path):
    run_corpus(smollm2, CORPUS, tmp_path, shard=(0, 2), chunk=4, progress=False)
    with pytest.raises(ArgumentError, match="shards 0..1 of 2"):
        merge_shards([tmp_path / "shard-0-of-2.json"])
    with pytest.raises(ArgumentError, match="fingerprint"):
        run_corpus(smollm2, CORPUS[:-1], tmp_path, shard=(0, 2), progress=False)  # another corpus, same --out
    record_path = tmp_path / "shard-1-of-2.json"
    run_corpus(smollm2, CORPUS, tmp_path, shard=(1, 2), chunk=4, progress=False)
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(record | {"prompts_done": 1}))
    with pytest.raises(ArgumentError, match="incomplete"):
        merge_shards([tmp_path / "shard-0-of-2.json", record_path])
    record_path.write_text(json.dumps(record | {"weights": "random"}))
    with pytest.raises(ArgumentError, match="weights"):
        merge_shards([tmp_path / "shard-0-of-2.json", record_path])
    for bad in ("2/2", "a/b", "1"):
        with pytest.raises(ArgumentError, match="shard"):
            parse_shard(bad)


def test_cli_shards_and_merge(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS[:4]):
        (corpus / f"{i}.txt").write_text(text)
    for shard in ("0/2", "1/2"):
        assert main(["corpus", "--prompts", str(corpus), "--out", str(tmp_path / "sharded"), "--shard", shard,
                     "--batch-size", "1"]) == 0
    assert "lensdyn merge" in capsys.readouterr().out
    records = sorted((tmp_path / "sharded").glob("shard-*.json"))
    assert main(["merge", *map(str, records), "--out", str(tmp_path / "sharded")]) == 0
    assert main(["corpus", "--prompts", str(corpus), "--out", str(tmp_path / "single"), "--batch-size", "1"]) == 0
    merged, single = (load_result(tmp_path / d / "corpus.json") for d in ("sharded", "single"))
    assert_same_statistics(merged, single)
    html = (tmp_path / "single" / "corpus.html").read_text()
    assert len(html) > 1_000_000 and html.count("Plotly.newPlot") == 2  # plotly inlined; streamed + subsample figures
    sample = load_result(tmp_path / "sharded" / "metastability_subsample.json")  # written by shard 0 only
    assert sample.provenance.n_prompts == 4 and sample.control is None
    assert main(["corpus", "--prompts", str(corpus), "--out", str(tmp_path / "x"), "--shard", "3/2"]) == 2


@pytest.mark.slow
def test_bfloat16_forward_float64_statistics(single, tmp_path):
    """bfloat16 activations stream into the same float64 accumulators; a(l) moves by bf16's precision, no more."""
    model = ld.load_model("smollm2-135m", dtype=torch.bfloat16)
    stats, record = run_corpus(model, CORPUS, tmp_path, chunk=4, progress=False)
    assert record["dtype"] == "bfloat16"
    low, full = corpus_result(stats, record), corpus_result(*single)
    assert np.isfinite(low.scale_factor).all() and low.scale_factor.dtype == np.float64
    np.testing.assert_allclose(low.scale_factor, full.scale_factor, rtol=0.05)
