"""The base every analysis result builds on.

A result is a frozen dataclass of numbers (numpy arrays with documented shapes, floats,
strings) plus ``conventions`` (how it was measured) and ``provenance`` (what it was measured
on, with which library versions). It serialises to standard JSON (lists and numbers, no pickles;
NaN as ``null`` and infinities as the strings ``"Infinity"`` / ``"-Infinity"``, so that strict
parsers such as JavaScript's ``JSON.parse`` read it) and loads back, NaN and infinities restored:

>>> result.to_json("norms.json")               # doctest: +SKIP
>>> ld.load_result("norms.json") == result     # doctest: +SKIP

Subclasses register themselves by class name, which ``to_dict`` writes as ``"kind"``, when their
module is imported; ``Result.from_dict`` knows the registered ones, and ``lensdyn.load_result``
(``lensdyn.analyses.registry``) imports every module that defines one before it reads. Declare
them ``@dataclass(frozen=True, eq=False)`` (so the base's array-safe ``__eq__`` is kept) and
annotate arrays with jaxtyping numpy types (``Float[np.ndarray, " state"]``): the loader reads
those hints to rebuild arrays, complex ones included.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lensdyn.conventions import LAYER_CONVENTION
from lensdyn.errors import ArgumentError



@dataclass(frozen=True)
class Conventions:
    """How a number was measured (``lensdyn.conventions``)."""

    aggregation: str
    excluded_positions: tuple[str, ...] = ("first",)
    layer_convention: str = LAYER_CONVENTION
    weights: str = "raw (no fold_ln, no centering)"
    dtype: str = "float64 statistics"
    layout: str = "unrecorded"  # the block layout the streams were read under (lensdyn.layouts)
    clustering: str = "none"  # a result that clusters: the library, its settings and the tie rule, to rerun it
    # The causal metrics the numbers use, by name (lensdyn.metric.METRICS, lensdyn.conventions 8); () when none.
    causal_metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Provenance:
    """What a number was measured on."""

    model: str
    weights: str
    seed: int
    layout: str
    prompt_set: str
    n_prompts: int
    n_tokens: int
    lensdyn_version: str
    created: str
    n_params: int | None = None
    # torch, transformers, transformer-lens, ...: the releases a number was measured with.
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    truncated: tuple[int, ...] = ()  # prompts cut to the model's context (their indices)
    # What the "massive" exclusion rule left out (lensdyn.conventions, 9): (prompt, position) pairs, and the
    # model whose residual stream they were found in (the trained model's for an untrained control).
    massive_positions: tuple[tuple[int, int], ...] = ()
    massive_source: str = ""

    @classmethod
    def from_capture(cls, capture) -> "Provenance":
        from lensdyn import __version__

        return cls(
            model=capture.model_info.name,
            weights=capture.model_info.weights,
            seed=capture.model_info.seed,
            layout=capture.model_info.layout,
            prompt_set=capture.prompts.name,
            n_prompts=capture.n_prompts,
            n_tokens=capture.n_tokens,
            lensdyn_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            n_params=capture.model_info.n_params,
            versions=library_versions(),
            truncated=tuple(capture.truncated),
            massive_positions=tuple(capture.massive_positions),
            massive_source=capture.massive_source,
        )


LIBRARIES = ("torch", "transformers", "transformer-lens", "numpy", "scipy", "hdbscan", "plotly")


def library_versions() -> dict[str, str]:
    """The installed release of each library a measurement depends on (``"not installed"`` where absent)."""
    import importlib.metadata

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


_REGISTRY: dict[str, type["Result"]] = {}


@dataclass(frozen=True)
class Result:
    """Base of every ``...Result``: conventions, provenance, JSON, figure, summary."""

    conventions: Conventions
    provenance: Provenance

    kind: ClassVar[str] = "Result"
    claims: ClassVar[tuple] = ()  # the write-ups' claims it tests (lensdyn.verdicts.Claim)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__
        _REGISTRY[cls.__name__] = cls

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: ``{"kind": ..., field: value, ...}``."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            if not f.metadata.get("transient"):
                out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        """Rebuild a result from ``to_dict()`` output (of this class or, from ``Result``, any registered one)."""
        target = _REGISTRY.get(data.get("kind", ""), cls) if cls is Result else cls
        if target is Result:
            raise ValueError(f"unknown result kind {data.get('kind')!r}; known: {sorted(_REGISTRY)}")
        return _rebuild(target, data)

    def figure(self):
        """A plotly Figure of the result."""
        raise NotImplementedError(f"{self.kind} has no figure")

    def summary(self) -> str:
        """A short text table of the result."""
        raise NotImplementedError(f"{self.kind} has no summary")

    def verdicts(self, **judge_options) -> list:
        """The write-ups' claims this result tests (its class's ``claims``), judged by stated rules with
        their bootstrap robustness (``lensdyn.verdicts.judge``, which takes ``judge_options``)."""
        from lensdyn.verdicts import judge

        return judge([self], **judge_options)

    def resample(self, rng) -> "Result | None":
        """This result on prompts drawn with replacement (``lensdyn.verdicts``, step 4), re-derived
        from its own per-prompt data: None where it has none (the default)."""
        return None

    def __eq__(self, other: object) -> bool:
        # Arrays make the dataclass __eq__ ambiguous; compare the plain data instead.
        if type(other) is not type(self):
            return NotImplemented
        return json.dumps(self.to_dict(), sort_keys=True) == json.dumps(other.to_dict(), sort_keys=True)

    __hash__ = None  # type: ignore[assignment]


def transient(default: Any = None) -> Any:
    """A result field held in memory only (not in ``to_dict``; it reads back as ``default``): data a
    bootstrap resample re-derives statistics from, too large or too raw for the JSON file."""
    return dataclasses.field(default=default, metadata={"transient": True}, repr=False)


def attach_control(result: Result, control, measure_random: Callable[[], Result] | None = None) -> Result:
    """``result`` with its untrained control: ``"random"`` runs ``measure_random()``, a result of
    the same kind is attached as is, None attaches nothing."""
    if isinstance(control, str):
        if control != "random":
            raise ArgumentError(f"control must be 'random', a {type(result).__name__}, or None, not {control!r}")
        if measure_random is None:
            raise ArgumentError("control='random' needs a way to measure it here: pass a result or None")
        control = measure_random()
    if control is not None and type(control) is not type(result):
        raise ArgumentError(f"control must be 'random', a {type(result).__name__}, or None, not {type(control).__name__}")
    return dataclasses.replace(result, control=control)


_NON_FINITE = {"Infinity": float("inf"), "-Infinity": float("-inf")}


def _json_number(x: float) -> float | str | None:
    """A float as standard JSON takes it: NaN -> None, +-inf -> "Infinity" / "-Infinity".

    >>> [_json_number(v) for v in (1.5, float("nan"), float("-inf"))]
    [1.5, None, '-Infinity']
    """
    if x != x:
        return None
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _finite_lists(value: Any) -> Any:
    if isinstance(value, list):
        return [_finite_lists(v) for v in value]
    return _json_number(value) if isinstance(value, float) else value


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if np.iscomplexobj(value):
            return {"real": _finite_lists(value.real.tolist()), "imag": _finite_lists(value.imag.tolist())}
        return _finite_lists(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float):
        return _json_number(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _floats(value: Any) -> Any:
    """JSON lists of numbers back to floats: ``None`` -> NaN, ``"Infinity"`` -> inf."""
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if value is None:
        return float("nan")
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _rebuild(hint: Any, value: Any) -> Any:
    """Undo ``_plain`` using the field's type hint."""
    if hint is float:  # a plain float field: null was NaN
        return _floats(value)
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if float in options and isinstance(value, str):
            return _floats(value)
        return _rebuild(options[0], value)
    if getattr(hint, "array_type", None) is np.ndarray:  # a jaxtyping numpy annotation
        if isinstance(value, dict) and set(value) == {"real", "imag"}:
            return np.asarray(_floats(value["real"])) + 1j * np.asarray(_floats(value["imag"]))
        dtypes = set(getattr(hint, "dtypes", ()))
        dtype = np.int64 if "int64" in dtypes else bool if dtypes == {"bool"} else np.float64
        return np.asarray(_floats(value) if dtype is np.float64 else value, dtype=dtype)
    if dataclasses.is_dataclass(hint):
        field_hints = typing.get_type_hints(hint)
        # A field a file predates takes its default (results written before it was added still load).
        return hint(**{f.name: _rebuild(field_hints[f.name], value[f.name])
                       for f in dataclasses.fields(hint) if f.name in value or not _has_default(f)})
    if origin is dict:
        value_hint = typing.get_args(hint)[1]
        return {k: _rebuild(value_hint, v) for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_rebuild(inner, v) for v in value)
    return value


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
