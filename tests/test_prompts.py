"""Built-in prompt sets and loaders."""
import json

import pytest

from lensdyn.errors import PromptError
from lensdyn.prompts import PromptSet, get_prompts, load_prompts, resolve_prompts


def test_diverse_set_covers_the_required_kinds():
    diverse = get_prompts("diverse")
    for label in ("prose-short", "prose-very-long", "python", "latex", "french", "german", "list"):
        assert label in diverse.labels
    assert "def " in diverse.texts[diverse.labels.index("python")]
    assert "\\begin{theorem}" in diverse.texts[diverse.labels.index("latex")]


@pytest.mark.slow
def test_diverse_lengths_span_20_to_450_tokens(smollm2_diverse):
    lengths = smollm2_diverse.token_mask.sum(1)
    assert lengths.min() <= 25 and 420 <= lengths.max() <= 512


@pytest.mark.slow
def test_repeated_prompts_are_one_token_repeated(smollm2):
    import lensdyn as ld

    cap = ld.capture(smollm2, "repeated", streams=("resid",))
    for i in range(cap.n_prompts):
        ids = cap.tokens[i][cap.token_mask[i]]
        assert len(set(ids.tolist())) == 1 and len(ids) >= 64


def test_unknown_set_names_the_built_in_sets():
    with pytest.raises(PromptError, match="diverse, varied, repeated"):
        get_prompts("nope")
    cli_message = r"unknown prompt set 'divers' \(did you mean 'diverse'\?\): built-in sets are diverse, varied, repeated"
    with pytest.raises(PromptError, match=cli_message):
        resolve_prompts("divers", allow_literal=False)
    with pytest.raises(PromptError, match='did you mean "diverse"'):
        resolve_prompts("divers")


def test_a_string_is_a_set_or_a_path_only_when_it_is_exactly_one(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("My own prompt.", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert resolve_prompts("diverse") is get_prompts("diverse")
    assert resolve_prompts("mine.txt").texts == ("My own prompt.",)
    assert resolve_prompts(["diverse "]).texts == ("diverse ",)  # a list is always literal prompts
    message = 'no built-in set or path named "diverse " (did you mean "diverse"?); to pass one prompt, give a list: ["diverse "]'
    with pytest.raises(PromptError) as caught:
        resolve_prompts("diverse ")
    assert str(caught.value) == message
    for near in ("Diverse", "\tdiverse\n", "repeat"):
        with pytest.raises(PromptError, match="did you mean"):
            resolve_prompts(near)
    with pytest.raises(PromptError, match='did you mean "mine.txt"'):
        resolve_prompts("mine.txt ")
    for missing in ("missing.txt", "corpus/", "~/prompts.jsonl", "data/set"):
        with pytest.raises(PromptError, match="no built-in set or path named .*give a list"):
            resolve_prompts(missing)
    with pytest.raises(PromptError, match="it is a contrast set"):
        resolve_prompts("sentiment")
    with pytest.raises(PromptError, match='did you mean the contrast set "formality"'):
        resolve_prompts("formalty")


def test_empty_string_is_an_empty_prompt_not_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "stray.txt").write_text("A file that happens to lie here.", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for empty in ("", "   ", "\n"):
        for allow_literal in (True, False):
            with pytest.raises(PromptError, match="empty prompt"):
                resolve_prompts(empty, allow_literal=allow_literal)
    assert resolve_prompts(".").texts == ("A file that happens to lie here.",)  # an explicit path still works


def test_unambiguous_literal_strings_stay_one_prompt():
    for text in ("hello", "A quiet evening by the river.", "a", get_prompts("diverse").texts[3]):
        assert resolve_prompts(text).texts == (text,)
    with pytest.raises(PromptError, match="unknown prompt set"):
        resolve_prompts("A quiet evening by the river.", allow_literal=False)


def test_loaders(tmp_path):
    (tmp_path / "one.txt").write_text("First text.", encoding="utf-8")
    (tmp_path / "two.txt").write_text("Second text.", encoding="utf-8")
    folder = load_prompts(tmp_path)
    assert folder.labels == ("one", "two") and folder.texts == ("First text.", "Second text.")
    assert load_prompts(tmp_path / "one.txt").texts == ("First text.",)
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text(json.dumps({"text": "a b c", "label": "abc"}) + "\n\n" + json.dumps({"text": "d e"}) + "\n")
    loaded = resolve_prompts(str(jsonl))
    assert loaded.texts == ("a b c", "d e") and loaded.labels == ("abc", "set[1]")


def test_loader_errors(tmp_path):
    with pytest.raises(PromptError, match="no .txt files"):
        load_prompts(tmp_path)
    with pytest.raises(PromptError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "oops"}\n')
    with pytest.raises(PromptError, match='bad.jsonl:1: expected a JSON object with a "text" field'):
        load_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(PromptError, match="empty"):
        load_prompts(empty)


def test_prompt_set_validation():
    with pytest.raises(PromptError, match="empty"):
        PromptSet("none", (), ())
    with pytest.raises(PromptError, match="2 texts but 1 labels"):
        PromptSet("x", ("a", "b"), ("a",))
    with pytest.raises(PromptError, match="empty prompt list"):
        resolve_prompts([])
    with pytest.raises(PromptError, match="cannot read prompts"):
        resolve_prompts(42)


def test_a_prompt_file_that_is_not_utf8_is_a_prompt_error_naming_it(tmp_path):
    from lensdyn.errors import PromptError
    from lensdyn.prompts import load_prompts

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(PromptError, match=r"latin1\.txt is not UTF-8"):
        load_prompts(bad)
    with pytest.raises(PromptError, match="is not UTF-8"):
        load_prompts(tmp_path)
