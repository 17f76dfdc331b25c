"""The built-in ``varied`` prompt set: its kinds, its independence from the other built-in texts, and
its lengths on the embedded models (smollm2-135m's 8192-token context, minilm-l6's 512)."""
import ast
import csv
import dataclasses
import io
import re

import pytest

from lensdyn.analyses.curvature import EDIT_PAIRS
from lensdyn.analyses.steering import CONTRAST_SETS
from lensdyn.errors import PromptTooLongError
from lensdyn.prompts import BUILTIN_PROMPT_SETS, get_prompts

SHINGLE = 8  # words: a sentence fragment this long in common would be copied text, not chance


def shingles(text: str, n: int = SHINGLE) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words, lowercased, punctuation dropped."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def strings_in(value) -> list[str]:
    """Every string held by a dataclass, tuple or dict, however nested."""
    if isinstance(value, str):
        return [value]
    if dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        value = list(value.values())
    return [s for item in value for s in strings_in(item)]


def varied_text(label: str) -> str:
    varied = get_prompts("varied")
    return varied.texts[varied.labels.index(label)]


def test_varied_is_a_built_in_set_of_at_least_20_uniquely_labelled_prompts():
    varied = get_prompts("varied")
    assert "varied" in BUILTIN_PROMPT_SETS and varied.name == "varied"
    assert len(varied) >= 20
    assert len(set(varied.labels)) == len(varied.labels)
    assert len(set(varied.texts)) == len(varied.texts)


def test_varied_covers_the_kinds_it_promises():
    labels = get_prompts("varied").labels
    for label in ("prose-short", "prose-medium", "prose-long", "prose-passage", "dialogue-chat", "dialogue-play",
                  "table-markdown", "table-csv", "list", "email", "numbers-units"):
        assert label in labels
    assert len([label for label in labels if label.startswith("code-")]) >= 2
    assert {"spanish", "italian", "dutch", "polish"} <= set(labels)


def test_varied_texts_are_what_their_labels_say():
    ast.parse(varied_text("code-python"))
    assert "fn main()" in varied_text("code-rust") and "function " in varied_text("code-javascript")
    rows = list(csv.reader(io.StringIO(varied_text("table-csv"))))
    assert len(rows) > 2 and {len(row) for row in rows} == {len(rows[0])}
    table = [line for line in varied_text("table-markdown").splitlines() if line.startswith("|")]
    assert len(table) > 2 and {line.count("|") for line in table} == {table[0].count("|")}
    assert re.match(r"[|]-+[|]", table[1])
    assert varied_text("email").startswith("Subject: ")
    chat = varied_text("dialogue-chat").splitlines()
    assert all(re.match(r"\[\d\d:\d\d\] \w+: ", line) for line in chat)
    for letter, language in (("ñ", "spanish"), ("ì", "italian"), ("ij", "dutch"), ("ą", "polish")):
        assert letter in varied_text(language)


def test_shingles_find_copied_text():
    # diverse's very long prose begins with its long prose: the check must see that.
    diverse = get_prompts("diverse")
    long, very_long = (diverse.texts[diverse.labels.index(label)] for label in ("prose-long", "prose-very-long"))
    assert shingles(long) <= shingles(very_long)
    assert shingles("One two three four five six seven.") == set()
    assert shingles("a b c d e f g h i", n=8) == {tuple("abcdefgh"), tuple("bcdefghi")}


def test_varied_shares_no_8_word_run_with_any_other_built_in_text():
    others = [text for name in BUILTIN_PROMPT_SETS if name != "varied" for text in get_prompts(name).texts]
    others += strings_in(EDIT_PAIRS) + strings_in(CONTRAST_SETS)
    seen = set().union(*(shingles(text) for text in others))
    for label, text in zip(get_prompts("varied").labels, get_prompts("varied").texts):
        common = shingles(text) & seen
        assert not common, f"{label} shares {sorted(common)[:3]}"


def test_varied_prompts_share_no_8_word_run_with_each_other():
    varied = get_prompts("varied")
    for i, (label, text) in enumerate(zip(varied.labels, varied.texts)):
        for other_label, other in zip(varied.labels[i + 1:], varied.texts[i + 1:]):
            assert not shingles(text) & shingles(other), (label, other_label)


@pytest.mark.slow
def test_varied_spans_a_sentence_to_a_1000_token_passage_on_smollm2(smollm2):
    from lensdyn.hooks.capture import included_counts

    lengths = dict(zip(get_prompts("varied").labels, included_counts(smollm2, "varied", exclude=())))
    assert max(lengths.values()) < smollm2.cfg.n_ctx
    assert lengths["prose-short"] <= 20
    assert 900 <= lengths["prose-passage"] <= 1200
    assert lengths["prose-short"] < lengths["prose-medium"] < lengths["prose-long"] < lengths["prose-passage"]
    assert max(lengths, key=lengths.get) == "prose-passage"


@pytest.mark.slow
def test_varied_captures_on_smollm2(smollm2):
    import lensdyn as ld
    from lensdyn.hooks.capture import included_counts

    cap = ld.capture(smollm2, "varied", streams=("resid",))
    varied = get_prompts("varied")
    assert cap.n_prompts == len(varied) and cap.prompts.labels == varied.labels and cap.truncated == ()
    assert cap.token_mask.sum(1).tolist() == included_counts(smollm2, "varied", exclude=())
    resid = cap.packed["resid"]
    assert resid.shape == (smollm2.cfg.n_layers + 1, int(cap.token_mask.sum()), smollm2.cfg.d_model)
    assert bool(resid.isfinite().all())


@pytest.mark.slow
def test_varied_on_minilm_is_refused_naming_truncate(minilm):
    import lensdyn as ld
    from lensdyn.hooks.capture import included_counts

    assert minilm.cfg.n_ctx == 512
    with pytest.raises(PromptTooLongError,
                       match=r"prompt 'prose-passage' has \d+ tokens but the model's context is 512; "
                             r"pass truncate=True \(CLI: --truncate\)"):
        ld.capture(minilm, "varied")
    counts = included_counts(minilm, "varied", exclude=(), truncate=True)
    labels = get_prompts("varied").labels
    assert counts[labels.index("prose-passage")] == 512
    assert all(n < 512 for label, n in zip(labels, counts) if label != "prose-passage")


@pytest.mark.slow
def test_varied_on_minilm_from_the_command_line_is_one_line_naming_truncate(minilm, monkeypatch, capsys, tmp_path):
    import lensdyn.models
    from lensdyn.app.cli import main

    monkeypatch.setattr(lensdyn.models, "load_model", lambda *args, **kwargs: minilm)
    argv = ["norms", "--model", "minilm-l6", "--prompts", "varied", "--control", "none", "--json-only",
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("lensdyn: error: prompt 'prose-passage' has ") and "--truncate" in err


def test_the_command_line_help_names_every_built_in_set():
    from lensdyn.app.cli import EPILOG

    assert f"built-in set ({', '.join(BUILTIN_PROMPT_SETS)})" in EPILOG
