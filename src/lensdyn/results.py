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

``to_frame()`` lays any result out as one long table (``pandas``), one row per number:

>>> df = result.to_frame()                                           # doctest: +SKIP
>>> df[(df.statistic == "mean") & (df.role == "model")][["index", "value"]]   # doctest: +SKIP

The same walk over the fields serves every result (``tidy_records``): a 1-D array over states
or blocks gives a row per entry, a scalar one row (``index`` NaN), a nested record its fields
under a prefix (``euclidean.scale_factor``), and the untrained control its own rows (``role``
``"control"``).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
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
    # Which weights (lensdyn.models.weights_source): "Q4_1 GGUF, dequantised to float32" for the default model.
    weights_source: str = ""

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
            weights_source=capture.model_info.weights_source,
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
    # Statistic name (before any "[" or ".") -> its units, where the name alone does not say (``UNITS``).
    units: ClassVar[dict[str, str]] = {}

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

    def to_frame(self):
        """A long-format ``pandas.DataFrame``: one row per number, columns ``FRAME_COLUMNS``.

        ``axis`` is what ``index`` counts (``"state"``, ``"block"``, ``"prompt"``, ...; ``"scalar"``
        with index NaN for a single number); the other axes of a 2-D array go into the statistic's
        name (``prompt_mean[prompt=1]`` at ``axis="state"``). ``role`` is ``"model"``, or
        ``"control"`` for the untrained control's rows; ``df.attrs`` holds ``kind``,
        ``conventions`` and ``provenance`` (the control's as ``control_provenance``).

        >>> df = norms_result.to_frame()                                   # doctest: +SKIP
        >>> df.pivot_table(index="index", columns=["role", "statistic"], values="value")  # doctest: +SKIP
        """
        import pandas as pd

        rows = []
        for role, result in self._roles():
            p = result.provenance
            units: dict[str, str] = {}  # per statistic, not per row: a result's 10^5 rows share 10^3 names
            rows += [(p.model, p.weights, role, axis, index, statistic, float(value),
                      units[statistic] if statistic in units else units.setdefault(statistic, result.units_of(statistic)))
                     for axis, index, statistic, value in result.tidy_records()]
        frame = pd.DataFrame(rows, columns=list(FRAME_COLUMNS))
        frame.attrs = {"kind": self.kind, "conventions": dataclasses.asdict(self.conventions),
                       "provenance": dataclasses.asdict(self.provenance)}
        for role, result in self._roles():
            if role != "model":
                frame.attrs[f"{role}_provenance"] = dataclasses.asdict(result.provenance)
        return frame

    def to_csv(self, path: str | Path | None = None, reference: "Result | None" = None, per_layer: bool = False) -> str:
        """``to_frame()`` as CSV text under a ``# `` header of its kind, provenance and conventions (written
        to ``path`` too when given); ``reference``: a reference run kept apart (the report's norms control),
        its rows with role ``"reference"``; ``per_layer``: only the rows indexed by state or block and not
        by token (the per-layer tables; per-token arrays are most of a result's numbers).

        ``pandas.read_csv(path, comment="#")`` reads it back.
        """
        import pandas as pd

        def rows(result: Result, role: str | None = None):
            frame = result._frame() if role is None else result._frame().assign(role=role)
            if not per_layer:
                return frame
            return frame[frame["axis"].isin(ROW_AXES) & ~frame["statistic"].str.contains("[token=", regex=False)]

        frame = rows(self)
        what = "per-layer rows only (indexed by state or block, not by token)" if per_layer else "one row per number"
        header = [f"lensdyn {self.kind}: long format, {what} ({', '.join(FRAME_COLUMNS)})"]
        header += [f"provenance.{k}: {v}" for k, v in dataclasses.asdict(self.provenance).items()]
        header += [f"conventions.{k}: {v}" for k, v in dataclasses.asdict(self.conventions).items()]
        if reference is not None:
            header += [f"reference.{k}: {v}" for k, v in dataclasses.asdict(reference.provenance).items()]
            frame = pd.concat([frame, rows(reference, "reference")], ignore_index=True)
        header.append("conventions in full: lensdyn.conventions (module docstring); units: the units column "
                      "('' where a statistic states none)")
        text = "".join(f"# {line}\n" for line in header) + frame.to_csv(index=False, lineterminator="\n")
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return text

    def _frame(self):
        """``to_frame()``, built once per result (a report writes two CSVs of it; a large result's frame takes
        seconds): results are immutable, and every caller here filters or copies it, never edits it."""
        cached = self.__dict__.get("_tidy_frame")
        if cached is None:
            cached = self.to_frame()
            object.__setattr__(self, "_tidy_frame", cached)  # not a field: no JSON, no comparison
        return cached

    def tidy_records(self):
        """``(axis, index, statistic, value)`` for every number of this result, its control's apart
        (``to_frame``); a result with a layout the generic walk reads poorly overrides this."""
        return _records(self, "")

    def units_of(self, statistic: str) -> str:
        """The units of a statistic: the class's ``units``, else ``UNITS`` by name, else ``""`` (not stated)."""
        stem = re.split(r"[\[.]", statistic)[0]
        if stem in self.units:
            return self.units[stem]
        return next((units for pattern, units in UNITS if re.search(pattern, statistic)), "")

    def _roles(self):
        yield "model", self
        control = getattr(self, "control", None)
        if isinstance(control, Result):
            yield "control", control

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


FRAME_COLUMNS = ("model", "weights", "role", "axis", "index", "statistic", "value", "units")
ROW_AXES = ("state", "block")  # a 2-D array's rows run over one of these where it has one
# Units read off a statistic's name, first match wins; a name none matches has its units unstated ("").
UNITS = (
    (r"(^|[._])p$|_p$|p_value", "p-value"),
    (r"spearman", "Spearman rho"),
    (r"gain", "ratio of norms"),
    (r"(^|[._])(count|n_[a-z_]+|carrier_tokens)($|[.\[])", "count"),
    (r"norm", "L2 norm (activation units)"),
)


def _records(obj: Any, prefix: str):
    """``(axis, index, statistic, value)`` for the numbers of a dataclass, walked field by field.

    >>> @dataclass
    ... class Track:
    ...     a: np.ndarray
    ...     top: float
    >>> list(_records(Track(np.array([1.0, 2.0]), 3.0), "t."))
    [('a', 0, 't.a', 1.0), ('a', 1, 't.a', 2.0), ('scalar', nan, 't.top', 3.0)]
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("transient") or value is None or (isinstance(obj, Result) and f.name in (
                "conventions", "provenance", "control")):
            continue
        yield from _value_records(value, hints.get(f.name), f"{prefix}{f.name}")


def _value_records(value: Any, hint: Any, name: str):
    if isinstance(value, (bool, int, float, np.generic)) and not isinstance(value, str):
        yield "scalar", float("nan"), name, value
    elif isinstance(value, np.ndarray):
        yield from _array_records(value, _dim_names(hint, value.ndim, name), name)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from _records(value, f"{name}.")
    elif isinstance(value, dict):
        inner = typing.get_args(_unwrap(hint))[1:2] or (None,)
        for key, item in value.items():
            yield from _value_records(item, inner[0], f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        if all(isinstance(v, (bool, int, float)) for v in value):
            yield from _array_records(np.asarray(value, dtype=float), (name.rsplit(".", 1)[-1],), name)
        else:
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    yield from _value_records(item, None, f"{name}[{i}]")


def _array_records(array: np.ndarray, dims: tuple[str, ...], name: str):
    if np.iscomplexobj(array):
        yield from _array_records(array.real, dims, f"{name}.real")
        yield from _array_records(array.imag, dims, f"{name}.imag")
        return
    if array.ndim == 0:
        yield "scalar", float("nan"), name, array.item()
        return
    row = next((i for i, d in enumerate(dims) if d in ROW_AXES), 0)
    for position in itertools.product(*map(range, array.shape)):
        others = ",".join(f"{d}={j}" for k, (d, j) in enumerate(zip(dims, position)) if k != row)
        yield dims[row], position[row], f"{name}[{others}]" if others else name, array[position].item()


def _dim_names(hint: Any, ndim: int, name: str) -> tuple[str, ...]:
    """The axis names of a jaxtyping annotation (``Float[np.ndarray, "prompt state"]``); unannotated, the
    field's own name (1-D) or ``name_axis0, ...``."""
    names = tuple(getattr(_unwrap(hint), "dim_str", "").split())
    if len(names) == ndim:
        return names
    stem = name.rsplit(".", 1)[-1]
    return (stem,) if ndim == 1 else tuple(f"{stem}_axis{k}" for k in range(ndim))


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


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
