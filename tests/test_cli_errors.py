"""Every error path of the lensdyn command: one line on stderr, exit 2, and as early as it can be found.

Checks that need no model must fail before one loads (``load_model`` is replaced by a function
that fails the test); checks that need its tokenizer or depth must fail before any forward pass
(``capture`` is replaced likewise). Where a model is needed, the session's smollm2 stands in for
``load_model``, so these tests load nothing themselves.
"""
import importlib
import json
import os

import pytest

import lensdyn.models
from lensdyn.app.cli import main, thread_count

capture_module = importlib.import_module("lensdyn.hooks.capture")  # lensdyn.hooks.capture is also the function


def exit_code(argv) -> int:
    """``main(argv)``, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lensdyn: error: ")
    return err


@pytest.fixture
def no_model(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before a check that needs no model")

    monkeypatch.setattr(lensdyn.models, "load_model", load_model)


@pytest.fixture
def smollm2_no_forward(smollm2, monkeypatch):
    """``load_model`` returns the session's smollm2; any capture fails the test."""
    from lensdyn.analyses.registry import analyses

    analyses()  # every analysis imported first, so that none binds the failing capture below for the tests after this one
    monkeypatch.setattr(lensdyn.models, "load_model", lambda *args, **kwargs: smollm2)

    def capture(*args, **kwargs):
        raise AssertionError("a forward pass ran before a check that needs only the tokenizer")

    monkeypatch.setattr(capture_module, "capture", capture)
    return smollm2


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("The lighthouse keeper counted the ships at dawn.")
    return path


# --- threads ------------------------------------------------------------------------------------


def test_thread_count_follows_the_option_then_omp_then_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_count() == 3  # the CPUs Slurm or taskset gave this process, not the machine's 64
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_count() == 2
    assert thread_count(5) == 5  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested levels: the first is ours
    assert thread_count() == 4
    for ignored in ("", "0", "many"):  # what OpenMP itself would ignore
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert thread_count() == 3
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    assert thread_count() == 64


def test_threads_option_sets_torch_threads(prompt_file, tmp_path, monkeypatch, capsys):
    import torch

    from lensdyn.errors import UnknownModelError

    def load_model(*args, **kwargs):
        raise UnknownModelError("no model in this test")

    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(lensdyn.models, "load_model", load_model)
    for command in ("norms", "corpus"):
        assert main([command, "--prompts", str(prompt_file), "--threads", "3", "--out", str(tmp_path / "o")]) == 2
    assert set_to == [3, 3]  # set before the model loads
    capsys.readouterr()
    assert main(["norms", "--threads", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--threads must be at least 1, not 0" in one_line_error(capsys)


# --- --out and cheap options, before the model loads ---------------------------------------------


def test_out_is_checked_before_the_model_loads(prompt_file, tmp_path, capsys, no_model):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = {
        str(a_file): "is a file, not a directory",
        str(a_file / "sub"): "is a file, so no directory can be made under it",
        "/proc/lensdyn-test/out": "cannot be made under /proc",  # no directory can be made in /proc, even as root
    }
    for out, reason in cases.items():
        for command in (["norms", "--prompts", str(prompt_file)], ["corpus", "--prompts", str(prompt_file)]):
            assert main([*command, "--out", out]) == 2
            assert reason in one_line_error(capsys), (command, out)
    assert main(["merge", str(tmp_path / "shard-0-of-1.json"), "--out", str(a_file)]) == 2
    assert "is a file, not a directory" in one_line_error(capsys)
    assert not list(tmp_path.glob(".lensdyn-probe-*")), "the write probe leaves nothing behind"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no process may make a directory")
def test_out_under_a_directory_nobody_may_write_is_refused(prompt_file, capsys, no_model):
    """The same refusal, run as any user, root included: not even root can make a directory in /proc."""
    assert main(["norms", "--prompts", str(prompt_file), "--out", "/proc/lensdyn-out"]) == 2
    assert "cannot be made under /proc" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (the /proc test covers root)")
def test_unwritable_out_parent_is_refused(prompt_file, tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["norms", "--prompts", str(prompt_file), "--out", str(locked / "out")]) == 2
    assert "cannot be made under" in one_line_error(capsys)


@pytest.mark.parametrize("argv, reason", [
    (["norms", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["corpus", "--chunk", "0"], "--chunk must be at least 1, not 0"),
    (["corpus", "--subsample", "-1"], "--subsample must be at least 0, not -1"),
    (["norms", "--seed", "-1"], "--seed must be at least 0, not -1"),
    (["expansion", "--permutations", "0"], "--permutations must be at least 1"),
    (["curvature", "--null-draws", "0"], "--null-draws must be at least 1"),
    (["metastability", "--min-cluster-size", "1"], "--min-cluster-size must be at least 2"),
    (["metastability", "--tie-tolerance", "nan"], "--tie-tolerance takes positive numbers, not nan"),
    (["stability", "--layers", "-1"], "--layers must be at least 0, not -1"),
    (["stability", "--context", "1"], "--context must be at least 2"),
    (["stability", "--betas", "1", "0"], "--betas takes positive numbers, not 0.0"),
    (["steering", "--relative", "nan"], "--relative takes positive numbers, not nan"),
    (["steering", "--bootstrap", "0"], "--bootstrap must be at least 1"),
    (["steering", "--transfer-layers", "5", "5"], "--transfer-layers needs at least 2 different blocks"),
    (["norms", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["norms", "--device", "cuda:99"], "--device cuda:99"),
    (["report", "--static", "gif"], "--static takes png and/or svg"),
    (["report", "--static", "png", "--static-scale", "0"], "--static-scale takes positive numbers, not 0.0"),
    (["norms", "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc' (see lensdyn norms --help)"),
])
def test_bad_options_are_refused_in_one_line_before_the_model_loads(argv, reason, prompt_file, tmp_path, capsys,
                                                                    no_model):
    assert exit_code([*argv, "--prompts", str(prompt_file), "--out", str(tmp_path / "out")]) == 2
    assert reason in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# --- prompt and contrast files ----------------------------------------------------------------------


def test_prompt_files_that_are_not_utf8_are_named(tmp_path, capsys, no_model):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Fine text.")
    (corpus / "b.txt").write_bytes(b"\xff\xfe broken")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    for spec, named in ((latin1, latin1), (corpus, corpus / "b.txt"), (jsonl, jsonl)):
        for command in ("norms", "corpus"):
            assert main([command, "--prompts", str(spec), "--out", str(tmp_path / "out")]) == 2
            err = one_line_error(capsys)
            assert f"{named} is not UTF-8 text" in err and "save it as UTF-8" in err


def test_malformed_contrast_files_are_one_line(tmp_path, capsys, no_model):
    cases = {"number.json": b"5", "numbers.json": json.dumps({k: 5 for k in (
        "positive", "negative", "evaluation", "positive_targets", "negative_targets")}).encode(),
        "latin1.json": '{"positive": ["caf\xe9"]}'.encode("latin-1")}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        assert main(["steering", "--contrast", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        assert f"--contrast {tmp_path / name}" in one_line_error(capsys)


# --- checks that need the tokenizer or the depth: after loading, before any forward pass ------------


def test_prompts_left_without_tokens_fail_before_the_forward_pass(tmp_path, capsys, smollm2_no_forward):
    one = tmp_path / "one.txt"
    one.write_text("Hi")  # one token for SmolLM2 (no BOS), and position 0 is excluded
    assert main(["norms", "--prompts", str(one), "--control", "none", "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert "no prompt of 'one' keeps a token after excluding ['first']" in err and "'Hi'" in err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "The river rose overnight."}) + "\n" + json.dumps({"text": "Hi"}) + "\n")
    assert main(["report", "--analyses", "norms,metastability", "--prompts", str(mixed), "--control", "none",
                 "--out", str(tmp_path / "o")]) == 2
    assert "prompt 1 ('mixed[1]': 'Hi') keeps 0 token(s)" in one_line_error(capsys)


def test_steering_targets_and_blocks_fail_before_the_forward_pass(tmp_path, capsys, smollm2_no_forward):
    contrast = {"positive": ["I loved it."], "negative": ["I hated it."], "evaluation": ["The film was"],
                "positive_targets": [" good", " wonderfully-crafted"], "negative_targets": [" bad"]}
    path = tmp_path / "contrast.json"
    path.write_text(json.dumps(contrast))
    base = ["steering", "--control", "none", "--out", str(tmp_path / "o")]
    assert main([*base, "--contrast", str(path)]) == 2
    assert "steering targets: ' wonderfully-crafted' is" in one_line_error(capsys)
    assert main([*base, "--steer-layers", "3", "30"]) == 2
    assert "--steer-layers [30]: this model's blocks are 0..29" in one_line_error(capsys)
    assert main([*base, "--transfer-layers", "3", "99"]) == 2
    assert "--transfer-layers [99]" in one_line_error(capsys)
    assert main(["stability", "--control", "none", "--layers", "40", "--out", str(tmp_path / "o")]) == 2
    assert "--layers [40]" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


# --- what --truncate cut ------------------------------------------------------------------------------


def test_truncation_is_reported_in_one_line(smollm2, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lensdyn.models, "load_model", lambda *args, **kwargs: smollm2)
    monkeypatch.setattr(smollm2.cfg, "n_ctx", 12)  # a context short enough to cut on CPU in a second
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "Seven ravens sat on the old stone wall, watching the empty road below."})
                       + "\n" + json.dumps({"text": "The bridge was closed."}) + "\n")
    argv = ["norms", "--prompts", str(prompts), "--control", "none", "--json-only", "--out", str(tmp_path / "o")]
    assert main(argv) == 2  # without --truncate: refused before the forward pass
    assert "has 16 tokens but the model's context is 12" in one_line_error(capsys)
    assert main([*argv, "--truncate"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "truncated" in line]
    assert lines == ["lensdyn: truncated 1 of 2 prompt(s) to their first 12 tokens, the context of smollm2-135m "
                     "(--truncate)"]


# --- the last nets: files, memory, Ctrl-C -----------------------------------------------------------


def test_os_errors_memory_and_interrupts_are_one_line(prompt_file, tmp_path, capsys, monkeypatch):
    def raising(error):
        def load_model(*args, **kwargs):
            raise error
        return load_model

    argv = ["norms", "--prompts", str(prompt_file), "--out", str(tmp_path / "o")]
    monkeypatch.setattr(lensdyn.models, "load_model", raising(OSError(28, "No space left on device", "/x/y.json")))
    assert main(argv) == 2
    assert one_line_error(capsys) == "lensdyn: error: /x/y.json: No space left on device"
    monkeypatch.setattr(lensdyn.models, "load_model", raising(MemoryError()))
    assert main(argv) == 2
    assert "out of memory (MemoryError): lower --batch-size" in one_line_error(capsys)
    monkeypatch.setattr(lensdyn.models, "load_model", raising(KeyboardInterrupt()))
    assert main(["corpus", "--prompts", str(prompt_file), "--out", str(tmp_path / "c")]) == 130
    assert capsys.readouterr().err.strip() == "lensdyn: interrupted: run the same command again to resume"
    monkeypatch.setattr(lensdyn.models, "load_model", raising(RuntimeError("a bug, not bad input")))
    with pytest.raises(RuntimeError, match="a bug"):  # a real fault keeps its traceback
        main(argv)


def test_messages_of_several_lines_become_one(prompt_file, tmp_path, capsys, monkeypatch):
    from lensdyn.errors import UnknownModelError

    def load_model(*args, **kwargs):
        raise UnknownModelError("cannot load model 'x/y': the hub said\n  404 Client Error\n\nRepository Not Found")

    monkeypatch.setattr(lensdyn.models, "load_model", load_model)
    assert main(["norms", "--prompts", str(prompt_file), "--model", "x/y", "--out", str(tmp_path / "o")]) == 2
    assert one_line_error(capsys) == ("lensdyn: error: cannot load model 'x/y': the hub said 404 Client Error "
                                      "Repository Not Found")
