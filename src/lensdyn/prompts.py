"""Built-in prompt sets and loaders for a user's own text.

A ``PromptSet`` is a named, labelled tuple of texts. Built-in sets (``get_prompts(name)``):

- ``diverse``: English prose from ~20 to ~450 tokens, Python source, LaTeX, French and
  German prose, and a list. All text was written for lensdyn.
- ``repeated``: one token repeated. A collapse control: report it apart, never average it
  with real prompts.

``load_prompts(path)`` reads a ``.txt`` file (one prompt), a ``.jsonl`` file (one
``{"text": ...}`` per line), or a directory of ``.txt`` files (one prompt each, sorted by name).
``resolve_prompts(x)`` accepts any of these, a built-in name, a string, or a list of strings;
a string that nearly names a set or a path (``"diverse "``) is an error, not a one-prompt set.

Data owned by one analysis lives with it: the clean/edited prompt pairs for deflection and
patching are ``lensdyn.analyses.curvature.EDIT_PAIRS``; the contrastive texts for steering
vectors (``sentiment``, ``formality``) are ``lensdyn.analyses.steering.CONTRAST_SETS``
(``resolve_contrast``). Their names are listed here (``CONTRAST_SET_NAMES``) only so that a
prompt string naming one is refused with a pointer there, never run as a one-prompt set.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from lensdyn.errors import PromptError


@dataclass(frozen=True)
class PromptSet:
    """Named prompts. ``labels[i]`` names ``texts[i]`` in tables and figures."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self):
        if not self.texts:
            raise PromptError(f"prompt set {self.name!r} is empty: give at least one prompt")
        if len(self.labels) != len(self.texts):
            raise PromptError(
                f"prompt set {self.name!r} has {len(self.texts)} texts but {len(self.labels)} labels"
            )
        for label, text in zip(self.labels, self.texts):
            if not isinstance(text, str) or not text.strip():
                raise PromptError(f"prompt {label!r} in set {self.name!r} is empty")

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_texts(cls, texts, name: str = "custom") -> "PromptSet":
        texts = tuple(texts)
        return cls(name=name, texts=texts, labels=tuple(f"{name}[{i}]" for i in range(len(texts))))


_SHORT = "The lighthouse keeper counted the ships at dawn, then wrote their names in a blue notebook."

_MEDIUM = (
    "Every spring the river below the mill rises with snowmelt from the hills. The miller's "
    "daughter keeps a chart on the kitchen wall: one line for each year, marking how far the "
    "water climbed up the stone steps. Most years it stops at the fourth step. Twice in her "
    "lifetime it reached the door, and both times the village carried sandbags through the night."
)

_LONG = (
    "When the observatory on the ridge was built, nobody expected it to become the busiest "
    "building in the valley. It had been meant for a handful of astronomers who would arrive in "
    "autumn, stay through the clear winter months, and leave again when the spring haze "
    "returned. Instead, the schoolteacher in the village below began bringing her class up the "
    "winding road every Thursday evening. The children took turns at the small refracting "
    "telescope, arguing about whether the smudge near the horizon was a galaxy or a cloud of dust. "
    "Soon their parents came too, carrying thermoses of soup and folding chairs, and the "
    "astronomers found themselves explaining the phases of Venus between their own observations. "
    "One of them, a quiet man who had spent a decade measuring the brightness of variable stars, "
    "started a notebook in which visitors could record what they saw. The entries were uneven: "
    "some were careful sketches of Saturn's rings, others simply said that the moon looked "
    "closer than it did from the bus stop. By the third winter the notebook had been replaced "
    "by a shelf of them, and a retired engineer from the village had volunteered to repair the "
    "dome's motor whenever it stalled in the cold."
)

_VERY_LONG = (
    _LONG
    + " The funding agency that paid for the observatory was puzzled by the reports it received. "
    "Its forms asked for the number of scientific papers, the hours of telescope time, and the "
    "fraction of nights lost to weather. They had no box for the number of children who now "
    "knew the names of the brightest stars, or for the farmer who had driven up one night to ask "
    "whether the light he kept seeing over his barn was a satellite. The director wrote long "
    "letters in the margins of the forms, describing the Thursday evenings, and the agency "
    "eventually sent an inspector. She arrived on a cloudy night, when nothing could be seen, "
    "and spent the evening in the library reading the visitors' notebooks instead. Her report "
    "recommended that the observatory's budget be renewed, and added, in a sentence that the "
    "staff later framed and hung beside the door, that an instrument is measured not only by "
    "what it sees but also by who is allowed to look through it. The following year the "
    "agency added a new line to its forms, asking how many members of the public had visited, "
    "and the director, for once, had an easy number to write."
)

_CODE = '''def moving_average(values, window):
    """Return the running mean of `values` over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = 0.0
    averages = []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averages.append(total / min(i + 1, window))
    return averages


print(moving_average([3, 1, 4, 1, 5, 9, 2, 6], window=3))
'''

_LATEX = r"""\begin{theorem}
Let $f\colon [a,b] \to \mathbb{R}$ be continuous and differentiable on $(a,b)$. Then there
exists $c \in (a,b)$ such that
\[
  f'(c) = \frac{f(b) - f(a)}{b - a}.
\]
\end{theorem}
\begin{proof}
Define $g(x) = f(x) - \frac{f(b)-f(a)}{b-a}(x-a)$. Then $g(a) = g(b)$, and by Rolle's
theorem there is $c$ with $g'(c) = 0$, which is the claim.
\end{proof}"""

_FRENCH = (
    "Le boulanger du quartier ouvre sa boutique avant le lever du soleil. Pendant que la ville "
    "dort encore, il sort du four les premières baguettes et les pose sur des grilles pour "
    "qu'elles refroidissent. Les habitués savent qu'il faut arriver tôt : à huit heures, les "
    "croissants aux amandes ont déjà disparu."
)

_GERMAN = (
    "Im Herbst sammeln die Kinder Kastanien im Park und bauen daraus kleine Tiere mit "
    "Streichhölzern als Beinen. Am Abend stehen die Figuren in einer langen Reihe auf der "
    "Fensterbank, und jedes Kind behauptet, seine sei die schönste."
)

_LIST = """Packing list for the field trip:
1. Waterproof jacket
2. Two pairs of wool socks
3. Notebook and pencils
4. Reusable water bottle
5. Sandwiches for lunch
6. Binoculars (optional)
7. Signed permission slip"""

_BUILTIN: dict[str, PromptSet] = {
    "diverse": PromptSet(
        name="diverse",
        texts=(_SHORT, _MEDIUM, _LONG, _VERY_LONG, _CODE, _LATEX, _FRENCH, _GERMAN, _LIST),
        labels=(
            "prose-short",
            "prose-medium",
            "prose-long",
            "prose-very-long",
            "python",
            "latex",
            "french",
            "german",
            "list",
        ),
    ),
    "repeated": PromptSet(
        name="repeated",
        texts=(" the" * 128, " A" * 64),
        labels=("repeated-the-128", "repeated-A-64"),
    ),
}

BUILTIN_PROMPT_SETS = tuple(_BUILTIN)

# The names of lensdyn.analyses.steering.CONTRAST_SETS. The core imports no analysis, so they are listed
# here, for the hints of resolve_prompts; tests/test_steering.py checks that they are exactly steering's.
CONTRAST_SET_NAMES = ("sentiment", "formality")


def get_prompts(name: str) -> PromptSet:
    """A built-in prompt set by name (``"diverse"`` or ``"repeated"``)."""
    try:
        return _BUILTIN[name]
    except KeyError:
        raise PromptError(
            f"unknown prompt set {name!r}: built-in sets are {', '.join(_BUILTIN)}; "
            "or give a .txt/.jsonl file or a directory of .txt files"
        ) from None


def _read_text(path: Path) -> str:
    """A prompt file's text; a file that is not UTF-8 is a ``PromptError`` naming it, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None


def load_prompts(path: str | Path) -> PromptSet:
    """Read prompts from a ``.txt`` file, a ``.jsonl`` file, or a directory of ``.txt`` files."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise PromptError(f"directory {path} holds no .txt files")
        texts = tuple(_read_text(f) for f in files)
        return PromptSet(name=path.name, texts=texts, labels=tuple(f.stem for f in files))
    if not path.is_file():
        raise PromptError(f"no such prompt file or directory: {path}")
    if path.suffix == ".jsonl":
        texts, labels = [], []
        for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PromptError(f'{path}:{line_no}: expected a JSON object with a "text" field') from None
            labels.append(str(record.get("label", f"{path.stem}[{len(labels)}]")))
        if not texts:
            raise PromptError(f"{path} holds no prompts")
        return PromptSet(name=path.stem, texts=tuple(texts), labels=tuple(labels))
    return PromptSet(name=path.stem, texts=(_read_text(path),), labels=(path.stem,))


def resolve_prompts(prompts, *, allow_literal: bool = True) -> PromptSet:
    """Turn what a user passes (a PromptSet, built-in name, path, string or list of strings) into a PromptSet.

    A string is a built-in set name or a path only when it is exactly one. A string that nearly
    is one (``"diverse "``, ``"divers"``, a missing ``"my.txt"``) is an error that says so, and an
    empty string is an empty prompt, never the current directory. Any other string is itself the
    one prompt, unless ``allow_literal=False`` (the CLI), where it is an error too: a mistyped set
    name must not silently become a one-prompt experiment. A list of strings is always prompts.
    """
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, Path):
        return load_prompts(prompts)
    if isinstance(prompts, str):
        return _resolve_string(prompts, allow_literal)
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        if not prompts:
            raise PromptError("empty prompt list: give at least one prompt")
        return PromptSet.from_texts(prompts)
    raise PromptError(
        f"cannot read prompts from {type(prompts).__name__}: give a PromptSet, a built-in name "
        f"({', '.join(_BUILTIN)}), a path, a string, or a list of strings"
    )


# Endings of the files load_prompts reads: a one-word string with one is meant as a path.
_PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


def _resolve_string(text: str, allow_literal: bool) -> PromptSet:
    """A built-in set, a prompt file or directory, or the one literal prompt ``text``; never a guess."""
    if not text.strip():
        # Path("") is the current directory: an empty string would read whatever .txt files lie there.
        raise PromptError(f"empty prompt {json.dumps(text)}: give a prompt text, a built-in set "
                          f"({', '.join(_BUILTIN)}), or a path")
    if text in _BUILTIN:
        return _BUILTIN[text]
    if _is_existing_path(text):
        return load_prompts(text)
    near = _near_name(text)
    if near is not None or _looks_like_a_path(text):
        raise PromptError(_not_a_name(text, near, allow_literal))
    if not allow_literal:
        get_prompts(text)  # raises, naming the built-in sets
    return PromptSet.from_texts([text])


def _is_existing_path(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # longer than a file name can be, or a NUL byte: a prompt, not a path
        return False


def _near_name(text: str) -> str | None:
    """The built-in set, contrast set or existing path ``text`` nearly names: other case, stray spaces, a typo."""
    key = text.strip()
    if key != text and (key in _BUILTIN or _is_existing_path(key)):
        return key
    names = {name.casefold(): name for name in (*_BUILTIN, *CONTRAST_SET_NAMES)}
    close = difflib.get_close_matches(key.casefold(), names, n=1, cutoff=0.8)
    return names[close[0]] if close else None


def _looks_like_a_path(text: str) -> bool:
    """One word with a directory separator, a leading ``~``, or a prompt file's ending."""
    if len(text.split()) != 1:
        return False
    word = text.strip()
    return "/" in word or "\\" in word or word.startswith("~") or word.lower().endswith(_PROMPT_FILE_SUFFIXES)


def _not_a_name(text: str, near: str | None, allow_literal: bool) -> str:
    """What was understood of a string that nearly names a set or path, and what to give instead."""
    quote = (lambda s: json.dumps(s, ensure_ascii=False)) if allow_literal else repr
    if near in CONTRAST_SET_NAMES and near == text.strip():
        hint = " (it is a contrast set, for steering: resolve_contrast)"
    elif near in CONTRAST_SET_NAMES:
        hint = f" (did you mean the contrast set {quote(near)}? contrast sets are for steering: resolve_contrast)"
    else:
        hint = f" (did you mean {quote(near)}?)" if near is not None else ""
    if allow_literal:
        return f"no built-in set or path named {quote(text)}{hint}; to pass one prompt, give a list: [{quote(text)}]"
    # The CLI's wording, as get_prompts words it: a command line cannot pass a list.
    return (f"unknown prompt set {text!r}{hint}: built-in sets are {', '.join(_BUILTIN)}; "
            "or give a .txt/.jsonl file or a directory of .txt files")
