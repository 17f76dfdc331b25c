"""Corpus streaming: shards merge into the single run, a stopped run resumes, mismatches are refused."""
import importlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import lensdyn as ld
from lensdyn import load_result
from lensdyn.app.cli import main
from lensdyn.app.corpus import corpus_result, merge_shards, parse_shard, run_corpus
from lensdyn.errors import ArgumentError

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


def smollm2_weights_source() -> str:
    from lensdyn.models import weights_source

    return weights_source("smollm2-135m", "pretrained")


def test_merged_shards_equal_the_single_run(smollm2, single, tmp_path):
    for i in range(3):
        # One prompt per forward pass: the same activations in any shard (batching changes them by ~1e-7).
        run_corpus(smollm2, CORPUS, tmp_path, shard=(i, 3), chunk=2, batch_size=1, progress=False)
    merged = corpus_result(*merge_shards(sorted(tmp_path.glob("shard-*.json"))))
    reference = corpus_result(*single)
    assert_same_statistics(merged, reference)
    assert merged.n_shards == 3 and reference.provenance.n_prompts == len(CORPUS)
    assert merged.conventions.causal_metrics == ("causal_inverse",)  # the metric of causal_scale_factor, by name
    assert merged.provenance.weights_source == reference.provenance.weights_source == smollm2_weights_source()
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
    with pytest.raises(KeyboardInterrupt):  # writing after every chunk
        run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False, checkpoint_seconds=0.0)
    record = json.loads((tmp_path / "shard-0-of-1.json").read_text())
    assert record["prompts_done"] == 3
    monkeypatch.setattr(capture_module, "capture", real_capture)
    stats, record = run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False)
    assert record["prompts_done"] == len(CORPUS)
    assert_same_statistics(corpus_result(stats, record), corpus_result(*single))
    assert [p.name for p in tmp_path.glob("*.npz")] == [record["stats_file"]]  # superseded checkpoints are gone


def test_a_run_writes_at_its_pace_and_after_its_last_chunk(smollm2, tmp_path, monkeypatch):
    corpus_module = importlib.import_module("lensdyn.app.corpus")
    real_checkpoint, written = corpus_module._checkpoint, []
    monkeypatch.setattr(corpus_module, "_checkpoint", lambda stats, record, path: (
        written.append(record["prompts_done"]), real_checkpoint(stats, record, path)))
    run_corpus(smollm2, CORPUS[:6], tmp_path / "hourly", chunk=2, progress=False, checkpoint_seconds=3600.0)
    assert written == [6]  # only the end: no chunk came an hour after the last write
    written.clear()
    run_corpus(smollm2, CORPUS[:6], tmp_path / "every", chunk=2, progress=False, checkpoint_seconds=0.0)
    assert written == [2, 4, 6]
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ArgumentError, match="checkpoint_seconds"):
            run_corpus(smollm2, CORPUS[:6], tmp_path / "bad", progress=False, checkpoint_seconds=bad)


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


# --- one run per shard; short prompts; damaged files ------------------------------------------------


def hold_lock(out, shard="0/1"):
    """Another process holding ``out``'s shard lock until killed; returns it once it holds the lock."""
    i, n = shard.split("/")
    code = ("import sys, time\nfrom lensdyn.app.corpus import shard_lock\n"
            f"with shard_lock(sys.argv[1], ({i}, {n})):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_of_a_shard_is_refused_and_a_killed_one_resumes(smollm2, single, tmp_path, monkeypatch, capsys):
    capture_module = importlib.import_module("lensdyn.hooks.capture")
    real_capture, calls = capture_module.capture, []

    def failing_capture(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(capture_module, "capture", failing_capture)
    with pytest.raises(KeyboardInterrupt):  # a first run stops after one chunk (and lets go of its lock)
        run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False, checkpoint_seconds=0.0)
    monkeypatch.setattr(capture_module, "capture", real_capture)
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(ArgumentError, match=rf"shard 0/1 in .* is in use by another run \(pid {holder.pid} on "):
            run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False)
        monkeypatch.setattr(ld.models, "load_model", lambda *a, **k: pytest.fail("the model loaded under a held lock"))
        assert main(["corpus", "--prompts", "diverse", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err
        run_corpus(smollm2, CORPUS, tmp_path, shard=(1, 2), chunk=3, progress=False)  # another shard: not blocked
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the flock
        holder.wait()
    assert json.loads((tmp_path / "shard-0-of-1.json").read_text())["prompts_done"] == 3
    stats, record = run_corpus(smollm2, CORPUS, tmp_path, chunk=3, batch_size=1, progress=False)
    assert record["prompts_done"] == len(CORPUS)
    assert_same_statistics(corpus_result(stats, record), corpus_result(*single))
    assert (tmp_path / "shard-0-of-1.lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_a_file_system_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    import errno

    from lensdyn.app import corpus

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(corpus.fcntl, "flock", no_locks)
    with corpus.shard_lock(tmp_path, (1, 4)) as path:
        assert path.name == "shard-1-of-4.lock"
    assert capsys.readouterr().err.strip() == (f"lensdyn: warning: cannot lock {path} (No locks available): nothing "
                                               "stops a second run of shard 1/4 there")


def test_short_prompts_are_refused_by_name_or_skipped_and_recorded(smollm2, single, tmp_path, capsys, monkeypatch):
    corpus = CORPUS[:2] + ["Hi"] + CORPUS[2:]  # "Hi" is one token; position 0 is excluded: nothing left
    with pytest.raises(ld.PromptError, match=r"prompt 2 \('custom\[2\]': 'Hi'\) of 'custom' keeps fewer than 2 tokens"):
        run_corpus(smollm2, corpus, tmp_path / "refused", chunk=3, batch_size=1, progress=False)
    assert not (tmp_path / "refused" / "shard-0-of-1.json").exists()  # refused before the run started
    stats, record = run_corpus(smollm2, corpus, tmp_path / "single", chunk=3, batch_size=1, progress=False,
                               skip_short=True)
    assert record["skipped"] == [2] and record["n_prompts"] == len(CORPUS)
    skipped = corpus_result(stats, record)
    assert_same_statistics(skipped, corpus_result(*single))  # the same prompts as CORPUS
    assert "1 prompt(s) with fewer than 2 included tokens left out" in skipped.conventions.aggregation
    with pytest.raises(ArgumentError, match="skip_short differ"):  # a resume under another setting
        run_corpus(smollm2, corpus, tmp_path / "single", chunk=3, batch_size=1, progress=False)
    for i in range(2):
        run_corpus(smollm2, corpus, tmp_path / "sharded", shard=(i, 2), chunk=2, batch_size=1, progress=False,
                   skip_short=True)
    merged_stats, merged = merge_shards(sorted((tmp_path / "sharded").glob("shard-*.json")))
    assert merged["skipped"] == [2] and merged["n_prompts"] == len(CORPUS)
    assert_same_statistics(corpus_result(merged_stats, merged), skipped)
    # The command line: refused before any forward pass, one line; --skip-short runs.
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in enumerate(corpus[:4]):
        (texts / f"{i}.txt").write_text(text)
    monkeypatch.setattr(ld.models, "load_model", lambda *a, **k: smollm2)
    argv = ["corpus", "--prompts", str(texts), "--out", str(tmp_path / "cli"), "--batch-size", "1", "--subsample", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt 2 ('2': 'Hi')" in err and "--skip-short" in err
    assert main([*argv, "--skip-short"]) == 0
    assert "left out 1 prompt(s) with fewer than 2 tokens" in capsys.readouterr().err
    assert load_result(tmp_path / "cli" / "corpus.json").provenance.n_prompts == 3


def test_the_subsample_is_checked_before_the_run(smollm2, tmp_path, capsys, monkeypatch):
    """Shard 0's subsample draws from every shard's prompts: a short one there fails before the run, not after it."""
    from lensdyn.app.corpus import usable_subsample

    corpus = ld.PromptSet.from_texts(CORPUS[:3] + ["Hi"], name="c")
    with pytest.raises(ld.PromptError, match=r"prompt 3 \('c\[3\]': 'Hi'\)"):
        usable_subsample(smollm2, corpus, 10)
    sample = usable_subsample(smollm2, corpus, 10, skip_short=True)
    assert sample.texts == tuple(CORPUS[:3]) and "1 short prompt(s) left out" in sample.name


def test_damaged_shard_files_are_one_line_naming_the_file_and_the_way_out(smollm2, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ld.models, "load_model", lambda *a, **k: smollm2)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, text in enumerate(CORPUS[:2]):
        (texts / f"{i}.txt").write_text(text)
    out = tmp_path / "out"
    corpus = ["corpus", "--prompts", str(texts), "--out", str(out), "--chunk", "1", "--subsample", "0"]
    assert main(corpus) == 0
    record_file = out / "shard-0-of-1.json"
    stats_file = out / json.loads(record_file.read_text())["stats_file"]
    good_record, good_stats = record_file.read_bytes(), stats_file.read_bytes()
    capsys.readouterr()

    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    merge = ["merge", str(record_file), "--out", str(out)]
    assert "holds a shard's accumulators, not its record" in error(["merge", str(stats_file), "--out", str(out)])
    assert f"no shard record {out / 'shard-1-of-1.json'}" in error(["merge", str(out / "shard-1-of-1.json"),
                                                                    "--out", str(out)])
    assert "is not a corpus shard record" in error(["merge", str(out / "corpus.json"), "--out", str(out)])
    record_file.write_bytes(good_record[: len(good_record) // 2])  # a record cut short (a full disk, a bad copy)
    assert f"{record_file} is damaged (JSONDecodeError" in error(merge)
    err = error(corpus)  # the resume reads it too
    assert f"{record_file} is damaged" in err and "--restart" in err
    record_file.write_bytes(good_record)
    stats_file.write_bytes(good_stats[:100])
    err = error(merge)
    assert f"{stats_file} is damaged (BadZipFile" in err and "--shard 0/1 --restart" in err
    assert f"{stats_file} is damaged" in error(corpus)
    stats_file.unlink()
    assert f"{stats_file}, which shard-0-of-1.json names, is missing" in error(merge)
    assert "is missing" in error(corpus)
    assert main([*corpus, "--restart"]) == 0  # the way out the messages name
    assert main(merge) == 0


# --- torchrun; chosen covariance states; the Frequent Directions sketch --------------------------------------------

WORDS = [" ".join(f"w{(7 * i + 3 * j) % 57 + 3}" for j in range(4 + i)) for i in range(5)]  # the tiny tokenizer's words


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A 2-block Llama checkpoint (d_model 32, random weights) and a directory of five short prompts."""
    from conftest import tiny_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_corpus")
    config = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    checkpoint = tiny_checkpoint(root / "ckpt", config, LlamaForCausalLM)
    (root / "corpus").mkdir()
    for i, text in enumerate(WORDS):
        (root / "corpus" / f"{i}.txt").write_text(text)
    return checkpoint, root / "corpus"


def test_two_torchrun_ranks_equal_one_process(tiny_corpus, tmp_path):
    """``torchrun --standalone --nproc-per-node 2 -m lensdyn.app.cli corpus`` (a free port): two gloo ranks, each its shard, reduced with
    torch.distributed, rank 0 writing corpus.json; equal to one process to float64 round-off (RTOL 1e-12).

    torchrun gives each rank one thread (OMP_NUM_THREADS=1): the single run uses one too, so every prompt's
    float32 activations are bitwise the same (at two threads they move by ~1e-8, matmul splits), and the only
    difference left is the order of float64 sums and merges, ~1e-16 per operation.
    """
    checkpoint, corpus = tiny_corpus
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lensdyn.app.cli", "corpus", "--model", checkpoint, "--prompts", str(corpus), "--out", str(out),
               "--batch-size", "1", "--subsample", "0"]
    # Its own session, so a run past the timeout is killed with its ranks (killing torchrun alone would
    # leave them waiting on each other).
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        _, stderr = job.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise
    assert job.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in out.glob("shard-*.json")) == ["shard-0-of-2.json", "shard-1-of-2.json"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = corpus_result(*run_corpus(ld.load_model(checkpoint), str(corpus), tmp_path / "one", batch_size=1,
                                           progress=False))
    finally:
        torch.set_num_threads(threads)
    ranks = load_result(out / "corpus.json")
    assert ranks.n_shards == 2 and ranks.provenance.n_prompts == len(WORDS)
    assert_same_statistics(ranks, single)
    # The shard records are those of `--shard i/2`: `lensdyn merge` over them gives the same result again.
    assert_same_statistics(corpus_result(*merge_shards(sorted(out.glob("shard-*.json")))), ranks)


def test_ranks_that_disagree_or_fail_raise_on_every_rank(monkeypatch):
    """What every rank runs after gathering: another rank's other corpus, or its failure, is an error here too."""
    import torch.distributed as dist

    from lensdyn.app import corpus

    record = {k: 0 for k in corpus.SETTINGS} | {"n_prompts_total": 5, "fingerprint": "abc"}
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def gathered(*others):
        monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None),
                                                                                                     [obj, *others]))

    gathered(dict(record, fingerprint="xyz"))
    with pytest.raises(ArgumentError, match="rank 1 of 2 runs another corpus or settings than rank 0 "
                                            r"\(fingerprint differ\)"):
        corpus._same_on_every_rank(record)
    gathered(dict(record))
    corpus._same_on_every_rank(record)
    gathered("PromptError: prompt 3 is too short")
    with pytest.raises(ArgumentError, match=r"rank 1 failed \(PromptError: prompt 3 is too short\): nothing was reduced"):
        corpus._no_rank_failed(None)


def test_covariance_states_and_the_sketch_cover_what_they_say(tiny_corpus, tmp_path):
    checkpoint, corpus = tiny_corpus
    model = ld.load_model(checkpoint)
    full = corpus_result(*run_corpus(model, str(corpus), tmp_path / "full", batch_size=1, progress=False))
    chosen = corpus_result(*run_corpus(model, str(corpus), tmp_path / "chosen", batch_size=1, progress=False,
                                       covariance_states=[0, 2]))
    assert chosen.covariance_states.tolist() == [0, 2] and full.covariance_states.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(chosen.top_eigenvalues[[0, 2]], full.top_eigenvalues[[0, 2]])
    assert np.isnan(chosen.participation_ratio[1]) and np.isnan(chosen.top_eigenvalues[1]).all()
    assert "at states [0, 2] only, NaN at the others" in chosen.conventions.aggregation
    np.testing.assert_array_equal(chosen.mean_norm, full.mean_norm)  # nothing else changes
    back = load_result(chosen.to_json(tmp_path / "chosen.json"))
    assert back.covariance_states.tolist() == [0, 2] and np.isnan(back.participation_ratio[1])
    # A sketch of more rows than d_model (32) is the exact spectrum; the participation ratio is not claimed.
    sketched = corpus_result(*run_corpus(model, str(corpus), tmp_path / "sketch", batch_size=1, progress=False,
                                         covariance_sketch=40))
    np.testing.assert_allclose(sketched.top_eigenvalues, full.top_eigenvalues, rtol=1e-9,
                               atol=1e-12 * full.top_eigenvalues.max())
    assert np.isnan(sketched.participation_ratio).all() and sketched.covariance_sketch == 40
    assert (sketched.eigenvalue_error <= 1e-12 * full.top_eigenvalues.max()).all()
    # Settings of the record: a resume or a merge under other states is refused; bad states are one line.
    with pytest.raises(ArgumentError, match="covariance_states differ"):
        run_corpus(model, str(corpus), tmp_path / "chosen", batch_size=1, progress=False, covariance_states=[0, 1])
    with pytest.raises(ArgumentError, match="covariance_sketch differ"):
        run_corpus(model, str(corpus), tmp_path / "full", batch_size=1, progress=False, covariance_sketch=40)
    for bad, message in (([0, 3], r"the model has states 0\.\.2"), ([1, 1], "once, in increasing order"),
                         ([2, 0], "increasing"), ([], "at least one")):
        with pytest.raises(ArgumentError, match=message):
            run_corpus(model, str(corpus), tmp_path / "bad", covariance_states=bad, progress=False)
    with pytest.raises(ArgumentError, match="above 10"):
        run_corpus(model, str(corpus), tmp_path / "bad", covariance_sketch=5, progress=False)
    assert main(["corpus", "--model", checkpoint, "--prompts", str(corpus), "--out", str(tmp_path / "cli"),
                 "--covariance-states", "0", "2", "--covariance-sketch", "12", "--subsample", "0", "--batch-size", "1"]) == 0
    cli = load_result(tmp_path / "cli" / "corpus.json")
    assert cli.covariance_sketch == 12 and cli.covariance_states.tolist() == [0, 2]
    assert np.isnan(cli.top_eigenvalues[1]).all() and (cli.top_eigenvalues[[0, 2]] >= 0).all()
