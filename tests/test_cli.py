"""The lensdyn command: exit codes, files written, a self-contained HTML page."""
import argparse
import contextlib
import importlib.util
import json
import re
import subprocess
import sys

import pytest

from lensdyn import load_result
from lensdyn.app.cli import _analysis_names, main


def test_models_lists_embedded_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "[default]" in out and "minilm-l6" in out


def test_help_is_readable():
    out = subprocess.run([sys.executable, "-m", "lensdyn.app.cli", "norms", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--model", "--prompts", "--out", "--control", "--exclude", "--truncate"):
        assert option in out.stdout


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["norms", "--model", "no-such-model", "--out", "x"], "unknown model 'no-such-model'"),
        (["norms", "--prompts", "divers", "--out", "x"], "unknown prompt set 'divers'"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, reason, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and reason in err
    assert not (tmp_path / "out").exists()


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["norms", "--weights", "trained", "--out", "x"])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_norms_writes_json_and_self_contained_html(tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("The river rose to the fourth step of the mill.")
    (prompts / "b.txt").write_text("Le boulanger ouvre sa boutique avant le lever du soleil.")
    out = tmp_path / "report"
    code = main(["norms", "--model", "minilm-l6", "--prompts", str(prompts), "--exclude", "special", "--out", str(out)])
    assert code == 0
    model, control = load_result(out / "norms.json"), load_result(out / "norms_reference.json")
    assert model.provenance.weights == "pretrained" and control.provenance.weights == "random"
    assert model.prompt_labels == ("a", "b") and len(model.mean) == 7
    assert model.conventions.excluded_positions == ("special",)
    html = (out / "norms.html").read_text()
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js is inlined
    assert not re.search(r"<script[^>]+src=", html), "no external scripts: the page must open offline"
    assert json.loads((out / "norms.json").read_text())["kind"] == "NormsResult"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_report_runs_every_analysis_from_one_capture_per_model(minilm_report):
    out = minilm_report
    expansion, gains = load_result(out / "expansion.json"), load_result(out / "gains.json")
    assert expansion.control.provenance.weights == "random" and gains.control.provenance.weights == "random"
    assert expansion.provenance.n_tokens == gains.provenance.n_tokens == load_result(out / "norms.json").provenance.n_tokens
    html = (out / "report.html").read_text()
    assert html.count("Plotly.newPlot") == 6  # norms, massive, expansion, gains, metastability, curvature
    assert load_result(out / "metastability.json").repeated.provenance.prompt_set == "repeated"
    index = json.loads((out / "report.json").read_text())
    assert index["reference"] == "untrained control" and set(index["files"]) >= {"norms", "expansion", "curvature"}
    assert "lens" not in index["files"]  # a default analysis that needs a causal LM is left out for an encoder
    verdicts = index["verdicts"]
    assert {v["verdict"] for v in verdicts} <= {"holds", "does not hold", "not testable here"}
    assert {v["source"] for v in verdicts} >= {"FLRW expansion note", "Pythia FFN expansion note"}
    # Three untrained controls by default, each in the reference column; two prompts are too few to resample.
    assert index["seeds"] == {"nulls_and_bootstrap": 0, "controls": [0, 1, 2]}
    assert all(v["reference"].count(" | ") == 2 for v in verdicts)
    assert all(v["robustness"] == "not testable" and "fewer than 5" in v["note"] for v in verdicts)
    assert 'id="verdicts"' in html and html.index('id="verdicts"') < html.index("Plotly.newPlot")
    # The header says which weights: minilm's are the original float32 ones (no quantisation note).
    assert index["weights_source"]["model"].startswith("model.safetensors") and "original float32" in html
    assert "quantised weights" not in html


def test_compare_json_only_and_bad_static_formats(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The lighthouse keeper counted the ships at dawn, then wrote their names in a notebook.")
    out = tmp_path / "cmp"
    code = main(["report", "--analyses", "norms,gains", "--model", "minilm-l6", "--compare", "smollm2-135m",
                 "--prompts", str(prompts), "--json-only", "--out", str(out)])
    assert code == 0
    gains = load_result(out / "gains.json")
    assert gains.provenance.model == "minilm-l6" and gains.control.provenance.model == "smollm2-135m"
    # Which weights each number is of: the default model is a dequantised Q4_1 GGUF, minilm the original float32.
    assert "original float32" in gains.provenance.weights_source
    assert "Q4_1 GGUF, dequantised to float32" in gains.control.provenance.weights_source
    index = json.loads((out / "report.json").read_text())
    assert index["reference"] == "smollm2-135m (compare)"
    assert index["weights_source"] == {"model": gains.provenance.weights_source,
                                       "reference": gains.control.provenance.weights_source}
    assert not list(out.glob("*.html"))
    assert main(["report", "--static", "gif", "--out", str(tmp_path / "x")]) == 2
    assert "png and/or svg" in capsys.readouterr().err


def test_side_by_side_and_serial_reports_are_identical(tmp_path):
    """The reference and the model measured in two threads give the same files as one after the other."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("The lighthouse keeper counted the ships at dawn, then wrote their names in a notebook.")
    outs = {mode: tmp_path / mode for mode in ("side_by_side", "serial")}
    for mode, out in outs.items():
        flags = ["--serial"] if mode == "serial" else []
        assert main(["report", "--analyses", "norms,expansion,gains,metastability", "--model", "minilm-l6",
                     "--prompts", str(prompts), "--exclude", "special", "--control-seeds", "0", "--json-only",
                     "--out", str(out), *flags]) == 0
    def undated(text: str) -> str:  # the creation time is the only field allowed to differ
        return re.sub(r'"created": "[^"]*"', "", text)

    for name in ("norms", "norms_reference", "expansion", "gains", "metastability"):
        side, serial = (undated((out / f"{name}.json").read_text()) for out in outs.values())
        assert side == serial, name
    index = json.loads((outs["side_by_side"] / "report.json").read_text())
    assert set(index["timings_s"]) == {"reference", "model", "wall"}


def test_verdicts_on_several_prompt_sets_with_their_bootstrap(tmp_path):
    """--prompts A B: the report is A's; the index holds every set's verdicts (each with its bootstrap share,
    effect and p-values) and whether they agree."""
    sets = []
    for name, words in (("a", "river mill dawn snow village"), ("b", "ships harbour storm lantern keeper")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"The {w} was seen again by everyone who walked past it today."})
                                + "\n" for w in words.split()))
        sets.append(str(path))
    out = tmp_path / "sets"
    assert main(["report", "--analyses", "gains", "--model", "minilm-l6", "--prompts", *sets, "--exclude", "special",
                 "--control-seeds", "0", "1", "--bootstrap", "30", "--seed", "4", "--json-only", "--out", str(out)]) == 0
    index = json.loads((out / "gains_report.json").read_text())
    assert index["prompts"] == "a" and index["seeds"] == {"nulls_and_bootstrap": 4, "controls": [0, 1]}
    assert set(index["verdicts_by_prompt_set"]) == {"a", "b"}
    rows = index["agreement_across_prompt_sets"]
    assert [r["claim"] for r in rows] == [v["claim"] for v in index["verdicts"]]
    for row in rows:
        assert row["agree"] == (row["verdicts"]["a"] == row["verdicts"]["b"])
    testable = [v for v in index["verdicts"] if v["verdict"] != "not testable here"]
    assert testable and all(v["n_resamples"] == 30 and 0 <= v["bootstrap_share"] <= 1 for v in testable)
    assert all(v["robustness"] in {"robust", "fragile"} for v in testable)


def test_single_analysis_commands_and_unknown_analyses(tmp_path, capsys):
    assert main(["report", "--analyses", "norms,cosmology", "--out", str(tmp_path)]) == 2
    assert "unknown analysis ['cosmology']" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "lensdyn.app.cli", "gains", "--help"], capture_output=True, text=True).stdout
    assert "--reference" in help_text and "--tokens" in help_text


def test_steering_command_writes_its_result(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The river rose through the night, and by morning the lower fields were under water.")
    out = tmp_path / "steer"
    code = main(["steering", "--prompts", str(prompts), "--control", "none", "--steer-layers", "5", "20", "27",
                 "--transfer-layers", "20", "27", "--relative", "0.25", "0.5", "--bootstrap", "5", "--out", str(out)])
    assert code == 0
    result = load_result(out / "steering.json")
    assert result.contrast == "sentiment" and result.layers.tolist() == [5, 20, 27]
    assert "Plotly.newPlot" in (out / "steering.html").read_text()
    assert main(["steering", "--contrast", "politeness", "--out", str(tmp_path / "x")]) == 2
    assert "unknown contrast set 'politeness'" in capsys.readouterr().err


def test_version_names_the_libraries_in_use(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for library in ("torch", "transformers", "transformer-lens"):
        assert f"{library} {importlib.metadata.version(library)}" in out


def test_models_check_prints_layout_self_test_and_supported_analyses(tmp_path, capsys):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from conftest import tiny_checkpoint

    config = GPTNeoXConfig(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64)
    path = tiny_checkpoint(tmp_path / "pythia", config, GPTNeoXForCausalLM)
    assert main(["models", "--check", path]) == 0
    out = capsys.readouterr().out
    assert "layout: parallel" in out and "self-test" in out and "passed" in out
    assert re.search(r"gains +yes \(MLP measured against the block input", out)
    assert main(["models", "--check", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _commands():
    """Every subcommand's parser, the analyses' ones generated from the registry."""
    from lensdyn.app.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_help_shows_each_default_once_and_every_option_its_help():
    from lensdyn.analyses.registry import analyses
    from lensdyn.app.parsing import HelpFormatter, Values

    parser, commands = _commands()
    assert {a.name for a in analyses()} | {"models", "report", "corpus", "merge", "study"} == set(commands)
    for name, command in [("lensdyn", parser), *commands.items()]:
        text = command.format_help()
        assert "default: None" not in text and "default: []" not in text, name
        formatter = HelpFormatter(name)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            shown = formatter._get_help_string(action)
            assert shown.count("default") <= 1, f"{where}: {shown}"
            if action.required:
                assert shown.endswith("(required)") and "default" not in shown, where
            if action.nargs in ("+", "*") and action.option_strings:  # one syntax for every list option
                assert isinstance(action, Values) and "comma" not in shown, where
        if command is not parser and name != "models":  # models prints a listing: what it is run for
            assert "--quiet" in text, name
    assert "--static [FORMAT ...]" in commands["report"].format_help()
    # Lists as typed, the empty one as `none`; the analysis's empty list is accepted as the word its help names.
    report = " ".join(commands["report"].format_help().split())
    assert "(default: 0 1 2)" in report and "(default: none)" in report
    args = parser.parse_args(["report", "--out", "x", "--patch-streams", "none", "--exclude", "none",
                              "--analyses", "norms,gains", "curvature"])
    assert args.patch_streams == [] and args.exclude == []
    assert _analysis_names(args.analyses) == ["norms", "gains", "curvature"]  # the old comma form still reads


@pytest.mark.parametrize("argv, reason", [
    (["corpus", "--prompts", "diverse", "--shard", "-1/2"], "shard '-1/2': need 0 <= i < n"),
    (["norms", "--exclude", "first,bos"], "list options take space-separated values"),
    (["stability", "--layers", "0,2"], "invalid int value: '0,2'; list options take space-separated values"),
    (["norms", "--exclude", "none", "first"], "--exclude none is the empty list: give it alone"),
    (["report", "--analyses", "norms", "cosmology"], "unknown analysis ['cosmology']"),
    (["norms", "--control-seeds", "0", "-2"], "--control-seeds must be at least 0, not -2"),
    (["corpus", "--prompts", "diverse", "--chunk", "0"], "--chunk must be at least 1, not 0"),
])
def test_bad_values_are_one_line(argv, reason, tmp_path, capsys):
    try:
        code = main([*argv, "--out", str(tmp_path / "out")])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and reason in err, err


def test_help_imports_no_torch(tmp_path, monkeypatch):
    """--help reads the analyses' options from the cache that a run (here, this process) writes: no torch imported,
    and the same help as the registry's."""
    from lensdyn.app import parsing
    from lensdyn.app.cli import _parser

    monkeypatch.setenv("LENSDYN_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")
    parsing.option_table()  # the registry's table, written to the cache
    assert len(list((tmp_path / "cli").glob("options-*.json"))) == 1
    check = ("import sys\nfrom lensdyn.app.cli import main\ntry:\n    main(['report', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    _, commands = _commands()
    assert run.stdout == commands["report"].format_help()
    assert run.stderr.strip().splitlines()[-1] == "no torch"


def _tiny_report(tmp_path, *flags):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import tiny_checkpoint

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny_checkpoint(tmp_path / "llama", config, LlamaForCausalLM)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w3 w4 w5 w6 w7 w8 w9 w10")
    out = tmp_path / "out"
    return main(["report", "--analyses", "norms", "gains", "--model", model, "--prompts", str(prompts),
                 "--control-seeds", "0", "--json-only", "--out", str(out), *flags]), out


def test_progress_in_a_log_is_plain_lines_weighted_by_work(tmp_path):
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr, contextlib.redirect_stderr(stderr):
        code, _ = _tiny_report(tmp_path)
    assert code == 0
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    # Two runs (model, one control), each a capture (1) + norms (cost 0.01) + gains (0.05), in captures.
    assert re.search(r"^report: 100% \(2\.12/2\.12 captures\) \d+ s: (model|reference) gains$", text, re.M), text


def test_quiet_prints_only_the_main_file(tmp_path, capsys):
    code, out = _tiny_report(tmp_path, "--quiet")
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(out / "report.json")]
    assert "report:" not in captured.err and "loaded in" not in captured.err


@pytest.mark.skipif(importlib.util.find_spec("ipywidgets") is not None, reason="the warning needs ipywidgets absent")
def test_no_iprogress_warning_in_a_notebook():
    """In a Jupyter kernel without ipywidgets, tqdm.auto (which huggingface_hub imports) warns on import."""
    kernel = ("import sys, types, warnings\nwarnings.simplefilter('always')\n"
              "sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')\n"
              "class ZMQInteractiveShell: pass\n"
              "sys.modules['IPython'] = types.SimpleNamespace(get_ipython=ZMQInteractiveShell)\n")
    runs = {name: subprocess.run([sys.executable, "-c", kernel + first + "import tqdm.auto\n"], capture_output=True,
                                 text=True) for name, first in (("bare", ""), ("lensdyn", "import lensdyn\n"))}
    assert "IProgress not found" in runs["bare"].stderr  # the simulated kernel shows it
    assert "IProgress" not in runs["lensdyn"].stderr and runs["lensdyn"].returncode == 0
