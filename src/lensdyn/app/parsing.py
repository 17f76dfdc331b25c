"""How the ``lensdyn`` command reads and shows its options.

- Help: each option's default once, as it is typed (``--exclude first``, not ``['first']``), nothing
  where there is none, "required" where it is (``HelpFormatter``).
- Lists: every list option takes space-separated values (``--analyses norms gains``); where an
  empty list means something, the word ``none`` alone gives it (``--exclude none``), as does the
  flag with no value (``Values``). ``--analyses`` also takes its old comma-separated form.
- The analyses' options (``option_table``): read off the registry, which imports every analysis
  and so torch (2-3 s). ``--help`` and ``--version`` read them from a cache instead, one file per
  version of lensdyn's sources, which every run that imports the registry writes if it is missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import textwrap
import types
import typing
from pathlib import Path

NONE = "none"  # the empty list, where a list option allows one


class HelpFormatter(argparse.HelpFormatter):
    """Help with each default once and as typed; text with its own line breaks keeps them (long lines wrap)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text  # a switch, no default, or one the help states itself
        return f"{text} (default: {shown(action.default)})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            lead = indent + " " * (len(line) - len(line.lstrip()))
            lines.append(textwrap.fill(line.strip(), width, initial_indent=lead, subsequent_indent=lead) or "")
        return "\n".join(lines)


def shown(value) -> str:
    """A default as it is typed on the command line: a list space-separated, the empty list ``none``.

    >>> shown(["first", "bos"]), shown(()), shown(0.5), shown("smollm2-135m")
    ('first bos', 'none', '0.5', 'smollm2-135m')
    """
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else NONE
    return str(value)


class Values(argparse.Action):
    """A list option: space-separated values; with ``empty``, the word ``none`` alone (or no value) is the empty list."""

    def __init__(self, option_strings, dest, *, empty: bool = False, choices=None, **kwargs):
        self.empty = empty
        if empty and choices is not None:
            choices = (*choices, NONE)
        super().__init__(option_strings, dest, nargs="*" if empty else "+", choices=choices, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.empty and NONE in values:
            others = [v for v in values if v != NONE]
            if others:
                parser.error(f"{option_string} {NONE} is the empty list: give it alone, not with {shown(others)}")
            values = []
        setattr(namespace, self.dest, list(values))


def split_commas(values: list[str]) -> list[str]:
    """Space-separated values, each of which may still be the old comma-separated form.

    >>> split_commas(["norms,gains", "curvature"])
    ['norms', 'gains', 'curvature']
    """
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def reading(hint, metadata) -> dict:
    """How the command line reads a parameter of type ``hint``, as JSON: a switch (bool), a list (tuple),
    choices (``Literal`` or ``option(choices=)``), a number type."""
    if hint is bool:
        return {"switch": True}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: None is the default, not a value
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    many = typing.get_origin(hint) is tuple
    element = typing.get_args(hint)[0] if many else hint
    choices = metadata.get("choices")
    if typing.get_origin(element) is typing.Literal:
        choices = typing.get_args(element)
        element = type(choices[0])
    out = {"type": element.__name__} if element in (int, float) else {}
    out |= {"list": True, "empty": bool(metadata.get("empty"))} if many else {}
    return out | ({"choices": list(choices)} if choices else {})


def argument(read: dict) -> dict:
    """``add_argument`` keywords for a ``reading``."""
    if read.get("switch"):
        return {"action": "store_true"}
    out = {"type": {"int": int, "float": float}[read["type"]]} if "type" in read else {}
    if read.get("choices"):
        out["choices"] = tuple(read["choices"])
    if read.get("list"):
        out |= {"action": Values, "empty": read["empty"]}
    return out


def describe(analysis) -> dict:
    """One analysis as the command line needs it, in JSON: its name, help, place in the default report and options."""
    from lensdyn.analyses.registry import flag

    hints = typing.get_type_hints(analysis.parameters)
    return {
        "name": analysis.name, "help": analysis.help, "opt_in": analysis.opt_in,
        "options": [{"name": f.name, "flag": flag(f), "default": f.default, "help": f.metadata["help"],
                     "reading": reading(hints[f.name], f.metadata)} for f in dataclasses.fields(analysis.parameters)],
    }


def option_table(cached: bool = False) -> dict:
    """The analyses' options and the constants the command's own options show (default model, exclusion rules).

    ``cached``: from the cache file of these sources if there is one (no torch imported), else from
    the registry. Read from the registry, the table is written to the cache if it is not there yet.
    """
    path = _cache_file()
    if cached and path is not None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: rebuilt below
            pass
    table = _live_table()
    if path is not None and not path.exists():
        _write(path, table)
    return table


def _live_table() -> dict:
    from lensdyn.analyses import registry
    from lensdyn.hooks.capture import EXCLUDE_RULES
    from lensdyn.models import DEFAULT_MODEL

    table = {"default_model": DEFAULT_MODEL, "exclude_rules": list(EXCLUDE_RULES),
             "analyses": [describe(a) for a in registry.analyses()]}
    return json.loads(json.dumps(table))  # as the cache holds it (tuples as lists): one table, cached or not


def _cache_file() -> Path | None:
    """The cache file of this version of lensdyn's sources (None: the sources cannot be read)."""
    from lensdyn.paths import cache_dir

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    try:
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    except OSError:
        return None
    return cache_dir() / "cli" / f"options-{digest.hexdigest()[:20]}.json"


def _write(path: Path, table: dict) -> None:
    """Best effort: an unwritable cache costs the next ``--help`` its speed, nothing else."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
            json.dump(table, f)
        os.replace(f.name, path)
    except OSError:
        pass
