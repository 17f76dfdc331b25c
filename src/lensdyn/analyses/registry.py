"""The analysis registry: each analysis module declares itself once, and the rest is built from that.

An analysis module ends with its parameters (a frozen dataclass whose fields are the options of
its ``measure()``, each made by ``option``: the default ``measure()`` has, a one-line help, and how
the command line spells and bounds it) and one ``ANALYSIS = Analysis(...)``::

    @dataclass(frozen=True)
    class GainsParameters:
        reference: str = option("ln_output", "what a sublayer's output is compared to", choices=REFERENCES)
        tokens: str = option("all", "all included tokens or each prompt's last", choices=TOKENS)

    ANALYSIS = Analysis(name="gains", help="attention / MLP / residual gain per block, with MLP phases",
                        heading="Sublayer gains", order=30, streams=STREAMS, result=GainsResult,
                        measure=measure, parameters=GainsParameters)

``analyses()`` finds every module of ``lensdyn.analyses`` that declares one (as scikit-learn's
``all_estimators`` finds estimators); the ``lensdyn`` command (one subcommand and one option group
per analysis, the report's sections), ``load_result`` and the doctest list are built from it, so
adding an analysis touches its own module, its test and the README table. The contract test
(``tests/test_contract.py``) holds every declaration to it: a parameter's default is
``measure()``'s, and every result round-trips through JSON, summarises, draws and judges.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lensdyn.results import Result


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    at_least: int | float | None = None,
    positive: bool = False,
    blocks: bool = False,
    distinct: int | None = None,
    capture: str | None = None,
    contrast: bool = False,
    empty: bool = False,
) -> Any:
    """One parameter of an analysis: a dataclass field with ``default`` and the command line's reading of it.

    A ``tuple[...]`` field takes any number of values on the command line, a ``bool`` is a switch,
    a ``Literal[...]`` offers its values as choices.
    ``flag``: the option's spelling where ``--`` + the field name would be wrong or taken
    (``--permutations`` for ``n_permutations``). ``choices``: the values allowed. ``at_least``: the
    least value (of each entry). ``positive``: each entry finite and above 0. ``blocks``: block
    indices, at least 0, below the model's depth once it loads. ``distinct``: the fewest different
    entries. ``capture``: the ``capture()`` keyword the shared capture needs switched on when this
    option is true (``"attention"``). ``contrast``: a contrast set (built-in name or JSON file),
    read before the model loads, whose targets must be single tokens of the loaded model. ``empty``:
    a tuple that may be empty, which the command line spells ``none``.
    """
    cli = dict(flag=flag, choices=choices, at_least=at_least, positive=positive, blocks=blocks, distinct=distinct,
               capture=capture, contrast=contrast, empty=empty)
    given = {k: v for k, v in cli.items() if v is not None and v is not False}
    return dataclasses.field(default=default, metadata={"help": help, **given})


def flag(parameter: dataclasses.Field) -> str:
    """A parameter's command-line spelling: its ``option(flag=)``, else ``--`` and its name with dashes."""
    return parameter.metadata.get("flag", "--" + parameter.name.replace("_", "-"))


@dataclass(frozen=True)
class NoParameters:
    """The parameters of an analysis that has no options."""


@dataclass(frozen=True)
class Analysis:
    """One analysis as the command line, the report and the result loader see it."""

    name: str  # the subcommand, the report's --analyses entry and the stem of its JSON file
    help: str  # one line, in `lensdyn --help` and atop `lensdyn NAME --help`
    heading: str  # the report section's heading, before "of MODEL"
    order: int  # place in the report and in listings (smaller first)
    streams: tuple[str, ...]  # the capture streams measure() reads
    result: type[Result]
    measure: Callable[..., Result]
    parameters: type = NoParameters
    # Time of measure() over that of the capture it reads (the report's progress weighs its steps by it): on
    # smollm2-135m, 9 prompts of "diverse", CPU, a capture takes 4.8 s, norms 0.01 s, massive 0.14, gains 0.26,
    # metastability 3.5, expansion 4.7-6.7, curvature 4-5; 1 where unmeasured.
    cost: float = 1.0
    opt_in: bool = False  # left out of the default report: it runs its own forward passes (seconds to minutes)
    causal: str = ""  # why it needs a causal language model ("" if it does not), said when refusing another
    min_tokens: int = 0  # tokens every prompt must keep after the exclusions (0: none asked of each prompt)
    # measure() keywords of the reference run (untrained control or --compare model), over the parameters.
    reference_keywords: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def keeps_reference_apart(self) -> bool:
        """Its result has no ``control`` to hold a reference run: the report writes that run beside it
        and draws the two together (``figure(control=reference)``)."""
        return not any(f.name == "control" for f in dataclasses.fields(self.result))

    def keywords(self, parameters=None, **context) -> dict[str, Any]:
        """``measure(capture, **keywords)`` for ``parameters`` (default: the defaults), then those of
        ``context`` (``model=``, ``control=``, ``seed=``, ...) that ``measure()`` names."""
        parameters = self.parameters() if parameters is None else parameters
        accepted = inspect.signature(self.measure).parameters
        values = {f.name: getattr(parameters, f.name) for f in dataclasses.fields(parameters)}
        return values | {k: v for k, v in context.items() if k in accepted}

    def capture_options(self, keywords: Mapping[str, Any]) -> dict[str, bool]:
        """The ``capture()`` keywords that ``measure(capture, **keywords)`` needs switched on (``option(capture=)``)."""
        return {f.metadata["capture"]: True for f in dataclasses.fields(self.parameters)
                if "capture" in f.metadata and keywords.get(f.name)}


@functools.cache
def analyses() -> tuple[Analysis, ...]:
    """Every analysis: the modules of ``lensdyn.analyses`` that declare ``ANALYSIS``, by ``order``."""
    import lensdyn.analyses

    found = []
    for info in pkgutil.iter_modules(lensdyn.analyses.__path__):
        declared = getattr(importlib.import_module(f"lensdyn.analyses.{info.name}"), "ANALYSIS", None)
        if isinstance(declared, Analysis):
            found.append(declared)
    names = [a.name for a in found]
    if len(set(names)) < len(names):
        raise TypeError(f"two analyses share a name: {sorted(n for n in names if names.count(n) > 1)}")
    return tuple(sorted(found, key=lambda a: a.order))


def get(name: str) -> Analysis:
    """The analysis called ``name``."""
    for analysis in analyses():
        if analysis.name == name:
            return analysis
    raise KeyError(f"no analysis {name!r}: the analyses are {', '.join(a.name for a in analyses())}")


def load_result(path: str | Path) -> Result:
    """Any result ``Result.to_json`` wrote, whichever module defines its kind.

    Result classes register when their module is imported, and a file may name one whose module
    this process never imported: every analysis and ``lensdyn.corpus_result`` are imported first.
    """
    analyses()
    importlib.import_module("lensdyn.corpus_result")
    return Result.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
