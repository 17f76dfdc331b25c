"""Streaming float64 accumulators: corpus-scale statistics batch by batch, mergeable across shards.

Statistics per state (or per block) over thousands of prompts cannot hold every token in memory. Each accumulator
here keeps a fixed-size float64 summary that grows with neither the number of prompts nor of
tokens; ``update`` folds in one batch, ``merge`` combines shards computed anywhere (another
machine, another order), and the final statistics equal a single run over all the data, and the
direct (non-streaming) lensdyn function, to float64 round-off.

Conventions shared by every accumulator:

- Input is packed: ``update(tokens)`` takes ``[state, token, d_model]`` rows (``[block, token,
  d_model]`` for a sublayer stream) that already are the tokens entering aggregates (e.g.
  ``lensdyn.ops.masked_tokens(cap.resid, cap.mask)``), in any float dtype (bfloat16 included).
  Per-token norms are ``lensdyn.ops.token_norms`` (the values the analyses see); everything else
  is converted to float64, and every sum over tokens or prompts is float64. Every state (or block)
  of a packed batch holds the same tokens, so one ``count`` serves all of them. Per-prompt
  statistics take a list of per-prompt clouds ``[state, n, d_model]`` instead.
- ``update`` changes the accumulator in place and returns it (for chaining); it checks the whole
  batch first (shape against what is held, float dtype, NaN/inf), so a refused batch leaves the
  accumulator unchanged. ``merge`` returns a **new** accumulator and changes neither operand;
  it is associative and commutative up to round-off, and an empty accumulator is its identity.
- Mixing data of different shape (states or blocks, ``d_model``), bins or betas raises ``ArgumentError``;
  NaN/inf raises ``NonFiniteActivationError`` (the message names the states or blocks and the tokens/prompts).
- ``to_dict()`` / ``from_dict()`` hold plain values and float64 (int64 for counts) arrays, so a
  shard survives ``.npz`` and ``.json`` exactly; ``save(obj, path)`` / ``load(path)`` write either
  (by suffix) for any accumulator or a ``StreamingStats`` container. ``merge_all`` folds shards.

The math of each statistic is not repeated here: per-token norms come from ``lensdyn.ops``, the
Hubble rate from ``lensdyn.fits``, and the sphere projection, Gram matrices, histogram binning and
interaction energy from ``lensdyn.sphere``: the functions the analyses call too, all in the core.

>>> x = torch.tensor([[[3., 4.], [0., 1.]], [[6., 8.], [0., 2.]]])      # 2 states, 2 tokens, d_model 2
>>> shard_a, shard_b = NormStats().update(x[:, :1]), NormStats().update(x[:, 1:])
>>> shard_a.merge(shard_b).scale_factor()                                # every token doubles
array([1., 2.])
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from lensdyn.errors import ArgumentError, NonFiniteActivationError
from lensdyn.fits import hubble
from lensdyn.ops import to_numpy as _numpy  # every batch is reduced on its own device; only the sums leave it
from lensdyn.ops import token_norms
from lensdyn.sphere import BETAS, BINS, cloud_grams, inner_product_histogram, interaction_energy

AGGREGATIONS = ("ratio_of_means", "mean_of_ratios")
FORMAT = "lensdyn.streaming/1"


# --- input checks ---------------------------------------------------------------------------


def check_batch(x: Tensor, where: str, shape: tuple[int | None, int | None] = (None, None), prompt: int | None = None) -> None:
    """Refuse a batch that is not a finite float ``[state or block, token, d_model]`` tensor matching ``shape = (n, d_model)``.

    ``prompt``: the batch is that prompt's cloud (its index in the batch goes into the error's ``prompt_indices``).

    >>> check_batch(torch.ones(2, 3, 4), "demo", (2, 4))
    >>> check_batch(torch.ones(3, 3, 4), "demo", (2, 4))
    Traceback (most recent call last):
    ...
    lensdyn.errors.ArgumentError: demo: the batch has 3 layers of d_model 4, but the accumulator holds 2 layers of d_model 4
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ArgumentError(f"{where}: expected a [layer, token, d_model] tensor, got {got}")
    if not x.is_floating_point():
        raise ArgumentError(f"{where}: expected a float tensor, got {x.dtype}")
    n_layers, d_model = shape
    if (n_layers is not None and x.shape[0] != n_layers) or (d_model is not None and x.shape[2] != d_model):
        raise ArgumentError(
            f"{where}: the batch has {x.shape[0]} layers of d_model {x.shape[2]}, "
            f"but the accumulator holds {n_layers} layers of d_model {d_model}"
        )
    # One sum is a cheap pass (20x faster than isfinite over the batch) and is non-finite whenever an element
    # is (NaN and inf propagate); only then is every element inspected, to name where, or to find a mere overflow.
    if bool(torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)))):
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    layers = torch.nonzero(bad.any(dim=2).any(dim=1)).flatten().tolist()
    rows = torch.nonzero(bad.any(dim=2).any(dim=0)).flatten().tolist()
    error = NonFiniteActivationError(where, int(bad.sum()), [] if prompt is None else [prompt])
    # The hook-oriented default message would call a batch a hook; say what was refused instead.
    error.args = (
        f"non-finite input to {where}: {int(bad.sum())} NaN/inf value(s) at layer(s) {layers[:10]}, "
        f"token(s) {rows[:10]} of this {'batch' if prompt is None else 'cloud'}; nothing was accumulated",
    )
    raise error


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ArgumentError(f"aggregation must be 'ratio_of_means' or 'mean_of_ratios', not {aggregation!r}")


# --- the shared machinery -------------------------------------------------------------------


class Accumulator:
    """Bookkeeping every accumulator shares: data shape, emptiness, merge, (de)serialisation.

    A subclass names its float64/int64 state arrays in ``ARRAYS`` and its configuration (bins,
    betas) in ``CONFIG``. Where every array merges by one elementwise operation it says which in
    ``REDUCTIONS`` (array -> ``"sum"``, ``"min"`` or ``"max"``) and the merge follows from that;
    otherwise it implements ``_combine(other)``: the merged state of two non-empty accumulators.
    ``REDUCTIONS`` is also what ``reduce_across_ranks`` reads: a plain accumulator is reduced with one
    collective per array, any other is sent whole and merged in rank order.
    ``count`` is what the statistics are averages over (tokens or prompts).
    """

    ARRAYS: tuple[str, ...] = ()
    INTEGER_ARRAYS: tuple[str, ...] = ()  # the exact counts among ARRAYS (int64); the rest are float64
    REDUCTIONS: Mapping[str, str] = {}  # every array's elementwise merge, for a plain accumulator; else empty
    CONFIG: tuple[str, ...] = ()
    UNIT = "token"

    def __init__(self) -> None:
        self.n_layers: int | None = None
        self.d_model: int | None = None
        self.count = 0
        for name in self.ARRAYS:
            setattr(self, name, None)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def __repr__(self) -> str:
        config = "".join(f", {name}={getattr(self, name)!r}" for name in self.CONFIG if name != "bins")
        return f"{type(self).__name__}({self.UNIT}s={self.count}, layers={self.n_layers}, d_model={self.d_model}{config})"

    def _where(self) -> str:
        return f"{type(self).__name__}.update"

    def _require(self) -> None:
        if self.empty:
            raise ArgumentError(f"{type(self).__name__} holds no {self.UNIT}s yet: call update() first")

    def _fresh(self) -> Accumulator:
        """An empty accumulator with this one's configuration."""
        return type(self)(**{name: getattr(self, name) for name in self.CONFIG})

    def _blank_like(self) -> Accumulator:
        """Empty, but expecting this one's shape: a batch checked against it is checked against ``self``."""
        out = self._fresh()
        out.n_layers, out.d_model = self.n_layers, self.d_model
        return out

    def copy(self) -> Accumulator:
        out = self._fresh()
        out.n_layers, out.d_model, out.count = self.n_layers, self.d_model, self.count
        for name in self.ARRAYS:
            value = getattr(self, name)
            setattr(out, name, None if value is None else value.copy())
        return out

    def _check_compatible(self, other: Accumulator) -> None:
        if type(other) is not type(self):
            raise ArgumentError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name in self.CONFIG:
            if not np.array_equal(np.asarray(getattr(self, name)), np.asarray(getattr(other, name))):
                raise ArgumentError(f"cannot merge {type(self).__name__}s with different {name}")
        if not (self.empty or other.empty) and (self.n_layers, self.d_model) != (other.n_layers, other.d_model):
            raise ArgumentError(
                f"cannot merge {type(self).__name__}s of {self.n_layers} layers / d_model {self.d_model} "
                f"and {other.n_layers} layers / d_model {other.d_model}"
            )

    def _absorb(self, other: Accumulator) -> Accumulator:
        """Fold ``other`` into this accumulator in place (the one place state changes)."""
        merged = self.merge(other)
        self.n_layers, self.d_model, self.count = merged.n_layers, merged.d_model, merged.count
        for name in self.ARRAYS:
            setattr(self, name, getattr(merged, name))
        return self

    @classmethod
    def plain(cls) -> bool:
        """Whether every array merges by its elementwise ``REDUCTIONS`` (so a sum/min/max collective reduces it)."""
        return bool(cls.ARRAYS) and set(cls.REDUCTIONS) == set(cls.ARRAYS)

    def _combine(self, other: Accumulator) -> dict[str, np.ndarray]:
        """The merged state arrays of two non-empty accumulators, as new arrays (by ``REDUCTIONS`` where plain)."""
        if not self.plain():
            raise NotImplementedError(f"{type(self).__name__} declares no REDUCTIONS and no _combine")
        return {name: _ELEMENTWISE[self.REDUCTIONS[name]](getattr(self, name), getattr(other, name))
                for name in self.ARRAYS}

    @property
    def nbytes(self) -> int:
        """Bytes of the state arrays held now (what a shard file and a reduction carry)."""
        return sum(getattr(self, name).nbytes for name in self.ARRAYS if getattr(self, name) is not None)

    def merge(self, other: Accumulator) -> Accumulator:
        """A new accumulator holding both shards; neither operand changes."""
        self._check_compatible(other)
        if other.empty or self.empty:
            return (self if other.empty else other).copy()
        out = self._fresh()
        out.n_layers, out.d_model, out.count = self.n_layers, self.d_model, self.count + other.count
        for name, value in self._combine(other).items():
            setattr(out, name, value)
        return out

    def to_dict(self) -> dict:
        """Plain values and float64/int64 arrays (copies); an empty accumulator has no state arrays."""
        out: dict = {"kind": type(self).__name__, "count": int(self.count)}
        for name in self.CONFIG:
            out[name] = np.asarray(getattr(self, name), dtype=np.float64)
        if not self.empty:
            out["n_layers"], out["d_model"] = int(self.n_layers), int(self.d_model)
            out.update({name: getattr(self, name).copy() for name in self.ARRAYS})
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> Accumulator:
        """Inverse of ``to_dict``; arrays may come back as nested lists (from JSON)."""
        kind = str(data["kind"])
        target = _KINDS.get(kind)
        if target is None or (cls is not Accumulator and target is not cls):
            raise ArgumentError(f"{cls.__name__}.from_dict got a {kind!r} record")
        out = target(**{name: np.asarray(data[name], dtype=np.float64) for name in target.CONFIG})
        out.count = int(data["count"])
        if out.count:
            out.n_layers, out.d_model = int(data["n_layers"]), int(data["d_model"])
            for name in target.ARRAYS:
                dtype = np.int64 if name in target.INTEGER_ARRAYS else np.float64
                setattr(out, name, np.array(data[name], dtype=dtype))
        return out

    def save(self, path: str | Path) -> Path:
        """Write this shard to ``path`` (``.npz`` or ``.json``, both exact); see the module's ``save``."""
        return save(self, path)


_ELEMENTWISE = {"sum": np.add, "min": np.minimum, "max": np.maximum}


# --- norms ----------------------------------------------------------------------------------


class NormStats(Accumulator):
    """Per-state statistics of token norms ``n_lt = ||x_lt||``: mean, population std, min, max, ``a(l)``, ``H(l)``.

    Each token's norm is ``lensdyn.ops.token_norms`` (at its precision, the same values the analyses
    see); everything over tokens is summed in float64.
    Held per state: ``total = sum_t n_lt``, ``m2 = sum_t (n_lt - mean_l)^2`` (merged by Chan et al.'s
    pairwise rule ``M2 = M2_a + M2_b + delta^2 n_a n_b / n`` instead of a raw sum of squares, which
    loses ``(mean / std)^2`` in relative precision), ``minimum``, ``maximum``, and
    ``ratio_total = sum_t n_lt / n_0t`` (each token against its own state-0 norm) for the
    mean-of-ratios scale factor.

    >>> x = torch.tensor([[[1., 0.], [3., 0.]], [[2., 0.], [6., 0.]]])    # state 1 = 2 x state 0
    >>> s = NormStats().update(x)
    >>> s.mean_norm, s.std_norm, s.scale_factor("mean_of_ratios")
    (array([2., 4.]), array([1., 2.]), array([1., 2.]))
    """

    ARRAYS = ("total", "m2", "minimum", "maximum", "ratio_total")

    def update(self, tokens: Float[Tensor, "state token d_model"]) -> NormStats:
        """Fold in one packed batch; returns ``self``."""
        check_batch(tokens, self._where(), (self.n_layers, self.d_model))
        norms = token_norms(tokens)  # [state, token] float64
        if norms.shape[1] == 0:
            return self
        batch = NormStats()
        batch.n_layers, batch.d_model, batch.count = tokens.shape[0], tokens.shape[2], norms.shape[1]
        # Two-pass within the batch (mean first), so the batch's own M2 is as accurate as the merge.
        batch.total = _numpy(norms.sum(dim=1))
        batch.m2 = _numpy(((norms - norms.mean(dim=1, keepdim=True)) ** 2).sum(dim=1))
        batch.minimum, batch.maximum = _numpy(norms.amin(dim=1)), _numpy(norms.amax(dim=1))
        # The same per-token ratio aggregate_ratio forms for scale_factor's "mean_of_ratios".
        batch.ratio_total = _numpy((norms / norms[:1].expand_as(norms)).sum(dim=1))
        return self._absorb(batch)

    def _combine(self, other: NormStats) -> dict[str, np.ndarray]:
        na, nb = self.count, other.count
        delta = other.total / nb - self.total / na
        return {
            "total": self.total + other.total,
            "m2": self.m2 + other.m2 + delta**2 * (na * nb / (na + nb)),
            "minimum": np.minimum(self.minimum, other.minimum),
            "maximum": np.maximum(self.maximum, other.maximum),
            "ratio_total": self.ratio_total + other.ratio_total,
        }

    @property
    def mean_norm(self) -> Float[np.ndarray, " state"]:
        """``mean_t n_lt``."""
        self._require()
        return self.total / self.count

    @property
    def variance_norm(self) -> Float[np.ndarray, " state"]:
        """Population variance ``mean_t (n_lt - mean_l)^2``."""
        self._require()
        return self.m2 / self.count

    @property
    def std_norm(self) -> Float[np.ndarray, " state"]:
        """Population standard deviation (``correction=0``) of the norms."""
        return np.sqrt(self.variance_norm)

    @property
    def min_norm(self) -> Float[np.ndarray, " state"]:
        self._require()
        return self.minimum.copy()

    @property
    def max_norm(self) -> Float[np.ndarray, " state"]:
        self._require()
        return self.maximum.copy()

    def scale_factor(self, aggregation: str = "ratio_of_means") -> Float[np.ndarray, " state"]:
        """``a(l)`` as ``lensdyn.analyses.expansion.scale_factor`` defines it, so ``a(0) = 1``.

        ``"ratio_of_means"``: ``mean_t n_lt / mean_t n_0t``; ``"mean_of_ratios"``: ``mean_t (n_lt / n_0t)``.
        """
        _check_aggregation(aggregation)
        self._require()
        if aggregation == "ratio_of_means":
            # aggregate_ratio's num.mean() / den.mean(), here with the means from the streamed sums.
            return self.mean_norm / self.mean_norm[0]
        return self.ratio_total / self.count

    def hubble_rate(self, aggregation: str = "ratio_of_means") -> Float[np.ndarray, " block"]:
        """``H(l) = log a(l+1) - log a(l)``, by ``lensdyn.fits.hubble`` (as ``lensdyn.analyses.expansion`` computes it)."""
        return hubble(self.scale_factor(aggregation))


# --- sublayer gains -------------------------------------------------------------------------


class GainStats(Accumulator):
    """``||output|| / ||reference||`` per block, streamed over (output, reference) token pairs.

    State per block: ``output_total = sum_t ||out_lt||``, ``reference_total = sum_t ||ref_lt||`` and
    ``ratio_total = sum_t ||out_lt|| / ||ref_lt||``, so ``gain(aggregation)`` equals
    ``lensdyn.ops.aggregate_ratio(token_norms(out), token_norms(ref), aggregation)`` over all tokens
    (as ``lensdyn.analyses.gains`` computes sublayer gains).

    >>> out, ref = torch.tensor([[[3., 4.], [2., 0.]]]), torch.tensor([[[1., 0.], [1., 0.]]])
    >>> s = GainStats().update(out, ref)
    >>> s.gain(), s.gain("mean_of_ratios")
    (array([3.5]), array([3.5]))
    """

    ARRAYS = ("output_total", "reference_total", "ratio_total")
    REDUCTIONS = dict.fromkeys(ARRAYS, "sum")

    def update(
        self, output: Float[Tensor, "block token d_model"], reference: Float[Tensor, "block token d_model"]
    ) -> GainStats:
        """Fold in one packed batch of sublayer outputs and the references they are measured against; returns ``self``."""
        check_batch(output, f"{self._where()} (output)", (self.n_layers, self.d_model))
        check_batch(reference, f"{self._where()} (reference)", (self.n_layers, self.d_model))
        if output.shape != reference.shape:
            raise ArgumentError(
                f"{self._where()}: output {tuple(output.shape)} and reference {tuple(reference.shape)} must hold the same tokens"
            )
        if output.shape[1] == 0:
            return self
        out, ref = token_norms(output), token_norms(reference)
        batch = GainStats()
        batch.n_layers, batch.d_model, batch.count = output.shape[0], output.shape[2], output.shape[1]
        batch.output_total, batch.reference_total = _numpy(out.sum(dim=1)), _numpy(ref.sum(dim=1))
        batch.ratio_total = _numpy((out / ref).sum(dim=1))
        return self._absorb(batch)

    @property
    def mean_output_norm(self) -> Float[np.ndarray, " block"]:
        self._require()
        return self.output_total / self.count

    @property
    def mean_reference_norm(self) -> Float[np.ndarray, " block"]:
        self._require()
        return self.reference_total / self.count

    def gain(self, aggregation: str = "ratio_of_means") -> Float[np.ndarray, " block"]:
        """``mean_t ||out|| / mean_t ||ref||`` (``"ratio_of_means"``) or ``mean_t (||out|| / ||ref||)``."""
        _check_aggregation(aggregation)
        self._require()
        if aggregation == "ratio_of_means":
            return self.mean_output_norm / self.mean_reference_norm
        return self.ratio_total / self.count


# --- covariance -----------------------------------------------------------------------------


class CovarianceStats(Accumulator):
    """Per-state mean vector and token covariance, merged by the parallel rule of Chan, Golub and LeVeque.

    Held per state: ``mean`` (``[state, d_model]``) and the centred co-moment
    ``comoment = sum_t (x_t - mean)(x_t - mean)^T`` (``[state, d_model, d_model]``), combined as
    ``C = C_a + C_b + (n_a n_b / n) delta delta^T`` with ``delta = mean_b - mean_a``.
    ``covariance = C / (n - 1)`` (as ``lensdyn.analyses.expansion.covariance_shape`` normalises);
    ``second_moment = C / n + mean mean^T`` (``E[x x^T]``).

    Memory: ``(n_layers + 1) x d_model^2`` float64, whatever the number of tokens: 82 MB for SmolLM2-135M
    (31 x 576^2), 1.9 GB for a 37-state, d_model 2560 model; a batch adds its own float64 copy.

    >>> x = torch.tensor([[[1., 0.], [-1., 0.], [0., 2.], [0., -2.]]])
    >>> CovarianceStats().update(x[:, :2]).merge(CovarianceStats().update(x[:, 2:])).covariance
    array([[[0.66666667, 0.        ],
            [0.        , 2.66666667]]])
    """

    ARRAYS = ("mean", "comoment")

    def update(self, tokens: Float[Tensor, "state token d_model"]) -> CovarianceStats:
        """Fold in one packed batch; returns ``self``."""
        check_batch(tokens, self._where(), (self.n_layers, self.d_model))
        if tokens.shape[1] == 0:
            return self
        x = tokens.to(torch.float64)
        mean = x.mean(dim=1)
        centred = x - mean[:, None, :]
        batch = self if self.empty else CovarianceStats()  # a first batch's own arrays are the state: no copy
        batch.n_layers, batch.d_model, batch.count = tokens.shape[0], tokens.shape[2], tokens.shape[1]
        batch.mean, batch.comoment = _numpy(mean), _numpy(centred.mT @ centred)
        return self if batch is self else self._absorb(batch)

    def _absorb(self, other: CovarianceStats) -> CovarianceStats:
        """Chan's rule (class docstring) in place: the ``state x d_model^2`` co-moment is the accumulator's bulk,
        and a merge into new arrays allocates three of it per batch (a third of a corpus run's accumulator time)."""
        self._check_compatible(other)
        if other.empty:
            return self
        if self.empty:
            self.n_layers, self.d_model, self.count = other.n_layers, other.d_model, other.count
            self.mean, self.comoment = other.mean.copy(), other.comoment.copy()
            return self
        na, nb = self.count, other.count
        delta = other.mean - self.mean
        held = torch.from_numpy(self.comoment)
        held.add_(torch.from_numpy(other.comoment))
        held.baddbmm_(torch.from_numpy(delta[:, :, None]), torch.from_numpy(delta[:, None, :]), alpha=na * nb / (na + nb))
        self.mean += delta * (nb / (na + nb))
        self.count = na + nb
        return self

    def _combine(self, other: CovarianceStats) -> dict[str, np.ndarray]:
        merged = self.copy()._absorb(other)
        return {"mean": merged.mean, "comoment": merged.comoment}

    @property
    def covariance(self) -> Float[np.ndarray, "state d_model d_model"]:
        """Sample covariance ``C / (n - 1)`` per state."""
        self._require()
        if self.count < 2:
            raise ArgumentError("a covariance needs at least 2 tokens")
        return self.comoment / (self.count - 1)

    @property
    def second_moment(self) -> Float[np.ndarray, "state d_model d_model"]:
        """Uncentred ``E[x x^T] = C / n + mean mean^T`` per state."""
        self._require()
        return self.comoment / self.count + self.mean[:, :, None] * self.mean[:, None, :]


def frequent_directions_shrink(
    rows: Float[np.ndarray, "state m d_model"], ell: int
) -> tuple[Float[np.ndarray, "state ell d_model"], Float[np.ndarray, " state"]]:
    """One Frequent Directions shrink (Liberty 2013; Ghashami et al. 2016): ``m`` rows -> ``ell`` rows ``B`` and ``delta``.

    With ``M = U S V^T``: ``delta = s_ell^2`` (the ``ell``-th largest squared singular value, 0 when
    there are fewer) and ``B = sqrt(max(S^2 - delta, 0)) V^T`` over the top ``ell`` directions, so
    ``0 <= M^T M - B^T B <= delta I`` and ``||M||_F^2 - ||B||_F^2 >= ell delta``: the two facts the
    sketch's error bound rests on. Computed from the ``m x m`` Gram matrix ``M M^T`` (``B = c U^T M``
    with ``c = sqrt(1 - delta / s^2)``): for ``m ~ 2 ell`` rows of a wide ``d_model`` that is 15x
    faster than an SVD, and its round-off (``~1e-16 s_1^2``) is far below any ``delta`` that matters.

    >>> b, delta = frequent_directions_shrink(np.diag([3., 2., 1.])[None], 2)
    >>> np.abs(b).tolist(), delta.tolist()        # s^2 = (9, 4, 1): delta = 4, what is left of 9 is 5
    ([[[2.23606797749979, 0.0, 0.0], [0.0, 0.0, 0.0]]], [4.0])
    """
    if ell < 1:
        raise ArgumentError(f"a Frequent Directions sketch needs ell >= 1 rows, not {ell}")
    squared, u = np.linalg.eigh(rows @ rows.transpose(0, 2, 1))  # ascending
    squared, u = np.clip(squared[:, ::-1][:, :ell], 0.0, None), u[:, :, ::-1][:, :, :ell]
    delta = squared[:, ell - 1].copy() if squared.shape[1] == ell else np.zeros(rows.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(squared > 0, 1 - delta[:, None] / squared, 0.0)
    sketch = np.sqrt(np.clip(keep, 0.0, None))[:, :, None] * (u.transpose(0, 2, 1) @ rows)
    if sketch.shape[1] < ell:  # fewer rows than ell so far: the sketch is exact, padded with zero rows
        sketch = np.concatenate([sketch, np.zeros((rows.shape[0], ell - sketch.shape[1], rows.shape[2]))], axis=1)
    return sketch, delta


class FrequentDirectionsStats(Accumulator):
    """A Frequent Directions sketch of each state's centred residual rows: the top of the covariance spectrum in
    ``state x ell x d_model`` floats instead of ``state x d_model^2``.

    What is sketched is the matrix ``A`` whose Gram is exactly ``CovarianceStats``' co-moment
    ``C = sum_t (x_t - mean)(x_t - mean)^T``: each batch's rows centred on the batch mean, plus, at
    every merge, the one row ``sqrt(n_a n_b / n) delta_mean`` of Chan et al.'s rule (so the mean is
    streamed exactly, not approximated). Rows enter ``ell`` at a time and the sketch ``B`` (``ell``
    rows) is shrunk by ``frequent_directions_shrink``; two sketches merge by stacking both and the
    correction row and shrinking once more, the mergeable form with the same guarantee
    (Ghashami, Liberty, Phillips and Woodruff 2016). For every unit ``x`` and every ``k < ell``:

        0 <= x^T (C - B^T B) x <= shrinkage <= ||A - A_k||_F^2 / (ell - k) = sum_{i>k} lambda_i(C) / (ell - k)

    where ``shrinkage`` is the sum of every shrink's ``delta`` (held, so the bound is known, not
    just bounded). By Weyl, each eigenvalue of the sketch's covariance ``B^T B / (n - 1)`` lies in
    ``[lambda_i - error_bound, lambda_i]`` with ``error_bound = shrinkage / (n - 1)``: the top-k
    eigenvalues are under-estimated by at most that. With ``ell >= d_model`` nothing is shrunk and
    the spectrum is exact. The participation ratio needs every eigenvalue, which a sketch does not keep.

    >>> x = torch.tensor([[[1., 0.], [-1., 0.], [0., 2.], [0., -2.]]])
    >>> s = FrequentDirectionsStats(ell=3).update(x[:, :2]).merge(FrequentDirectionsStats(ell=3).update(x[:, 2:]))
    >>> s.eigenvalues.round(6).tolist(), s.error_bound.tolist()   # CovarianceStats' 8/3 and 2/3: ell > d_model, exact
    ([[2.666667, 0.666667, 0.0]], [0.0])
    >>> s = FrequentDirectionsStats(ell=2).update(x)            # one row kept: 8/3 less the bound, 2/3 lost
    >>> s.eigenvalues.round(6).tolist(), s.error_bound.round(6).tolist()
    ([[2.0, 0.0]], [0.666667])
    """

    ARRAYS = ("mean", "sketch", "shrinkage")
    CONFIG = ("ell",)

    def __init__(self, ell: int | np.ndarray = 64) -> None:  # from_dict restores CONFIG as 0-d float64 arrays
        super().__init__()
        if float(ell) != int(ell) or int(ell) < 2:
            raise ArgumentError(f"a Frequent Directions sketch needs an integer ell >= 2 rows, not {ell}")
        self.ell = int(ell)

    def update(self, tokens: Float[Tensor, "state token d_model"]) -> FrequentDirectionsStats:
        """Fold in one packed batch (centred on its own mean, then sketched ``ell`` rows at a time); returns ``self``."""
        check_batch(tokens, self._where(), (self.n_layers, self.d_model))
        if tokens.shape[1] == 0:
            return self
        x = tokens.to(torch.float64)
        mean = x.mean(dim=1)
        centred = _numpy(x - mean[:, None, :])
        sketch, shrinkage = np.zeros((x.shape[0], 0, x.shape[2])), np.zeros(x.shape[0])
        for start in range(0, x.shape[1], self.ell):
            sketch, delta = frequent_directions_shrink(
                np.concatenate([sketch, centred[:, start: start + self.ell]], axis=1), self.ell)
            shrinkage = shrinkage + delta
        batch = FrequentDirectionsStats(self.ell)
        batch.n_layers, batch.d_model, batch.count = tokens.shape[0], tokens.shape[2], tokens.shape[1]
        batch.mean, batch.sketch, batch.shrinkage = _numpy(mean), sketch, shrinkage
        return self._absorb(batch)

    def _combine(self, other: FrequentDirectionsStats) -> dict[str, np.ndarray]:
        na, nb = self.count, other.count
        delta = other.mean - self.mean
        correction = np.sqrt(na * nb / (na + nb)) * delta[:, None, :]
        sketch, shrink = frequent_directions_shrink(np.concatenate([self.sketch, other.sketch, correction], axis=1),
                                                    self.ell)
        return {"mean": self.mean + delta * (nb / (na + nb)), "sketch": sketch,
                "shrinkage": self.shrinkage + other.shrinkage + shrink}

    @property
    def eigenvalues(self) -> Float[np.ndarray, "state ell"]:
        """The sketch's covariance spectrum ``sigma_i(B)^2 / (n - 1)``, descending: each at most ``error_bound`` below
        the exact ``lambda_i``."""
        self._require()
        if self.count < 2:
            raise ArgumentError("a covariance needs at least 2 tokens")
        gram = self.sketch @ self.sketch.transpose(0, 2, 1)  # ell x ell: B B^T shares B^T B's nonzero spectrum
        return np.clip(np.linalg.eigvalsh(gram)[:, ::-1], 0.0, None) / (self.count - 1)

    @property
    def error_bound(self) -> Float[np.ndarray, " state"]:
        """``shrinkage / (n - 1)``: the largest under-estimate of any covariance eigenvalue (class docstring)."""
        self._require()
        return self.shrinkage / (self.count - 1)


class RegressionStats(Accumulator):
    """Per state, the streamed moments of a linear regression of ``y`` on ``x``, and its ridge fit in closed form.

    Held per state: ``mean_x``, ``mean_y`` (``[state, d_model]``) and the centred co-moments
    ``cxx = sum_t (x_t - mean_x)(x_t - mean_x)^T`` and ``cxy = sum_t (x_t - mean_x)(y_t - mean_y)^T``
    (``[state, d_model, d_model]``), merged by Chan, Golub and LeVeque's rule as ``CovarianceStats``
    merges its co-moment (``C_xy = C_a + C_b + (n_a n_b / n) delta_x delta_y^T``); these are the
    sums of ``x``, ``y``, ``x x^T`` and ``x y^T``, held centred so that a large mean costs no precision.

    ``ridge(r)`` minimises ``sum_t ||y_t - W^T x_t - b||^2 + lam ||W||_F^2`` (the bias unpenalised):
    ``W = (cxx + lam I)^-1 cxy``, ``b = mean_y - W^T mean_x``, with ``lam = r * tr(cxx) / d_model``
    (``r`` relative to the mean eigenvalue of ``cxx``, so one ``r`` means the same at every state
    whatever its scale). ``r = 0`` is ordinary least squares (tested against ``numpy.linalg.lstsq``).
    Memory: two ``[state, d_model, d_model]`` float64 arrays, 165 MB for SmolLM2-135M (31 x 576^2 x 2).

    >>> x = torch.tensor([[[0.], [1.], [2.]]])                      # one state, 3 tokens, d_model 1
    >>> w, b = RegressionStats().update(x, 3 * x + 1).ridge(0.0)     # y = 3 x + 1
    >>> w.round(12).tolist(), b.round(12).tolist()
    ([[[3.0]]], [[1.0]])
    """

    ARRAYS = ("mean_x", "mean_y", "cxx", "cxy")

    def update(self, x: Float[Tensor, "state token d_model"], y: Float[Tensor, "state token d_model"]) -> RegressionStats:
        """Fold in one packed batch of inputs ``x`` and targets ``y`` (the same tokens); returns ``self``."""
        check_batch(x, f"{self._where()} (x)", (self.n_layers, self.d_model))
        check_batch(y, f"{self._where()} (y)", (self.n_layers, self.d_model))
        if x.shape != y.shape:
            raise ArgumentError(f"{self._where()}: x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same tokens")
        if x.shape[1] == 0:
            return self
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        mean_x, mean_y = x64.mean(dim=1), y64.mean(dim=1)
        cx, cy = x64 - mean_x[:, None], y64 - mean_y[:, None]
        batch = RegressionStats()
        batch.n_layers, batch.d_model, batch.count = x.shape[0], x.shape[2], x.shape[1]
        batch.mean_x, batch.mean_y = _numpy(mean_x), _numpy(mean_y)
        batch.cxx, batch.cxy = _numpy(cx.mT @ cx), _numpy(cx.mT @ cy)
        return self._absorb(batch)

    def _combine(self, other: RegressionStats) -> dict[str, np.ndarray]:
        na, nb = self.count, other.count
        n = na + nb
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        return {
            "mean_x": self.mean_x + dx * (nb / n),
            "mean_y": self.mean_y + dy * (nb / n),
            "cxx": self.cxx + other.cxx + (na * nb / n) * dx[:, :, None] * dx[:, None, :],
            "cxy": self.cxy + other.cxy + (na * nb / n) * dx[:, :, None] * dy[:, None, :],
        }

    def ridge(self, ridge: float = 0.0) -> tuple[Float[np.ndarray, "state d_model d_model"], Float[np.ndarray, "state d_model"]]:
        """``(W, b)`` per state with ``y ~ x W + b`` (class docstring); ``ridge`` relative to ``tr(cxx) / d_model``."""
        self._require()
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ArgumentError(f"ridge must be finite and >= 0, got {ridge}")
        lam = ridge * np.trace(self.cxx, axis1=1, axis2=2) / self.d_model
        system = self.cxx + lam[:, None, None] * np.eye(self.d_model)
        try:
            weight = np.linalg.solve(system, self.cxy)
        except np.linalg.LinAlgError:
            raise ArgumentError(f"the regression is singular ({self.count} tokens for d_model {self.d_model}): "
                                "give a ridge above 0 or more tokens") from None
        return weight, self.mean_y - np.einsum("si,sij->sj", self.mean_x, weight)


# --- per-prompt clouds on the sphere --------------------------------------------------------


class CloudAccumulator(Accumulator):
    """Statistics of per-prompt clouds: ``update(clouds)`` takes ``[state, n, d_model]`` per prompt, ``count`` is prompts."""

    UNIT = "prompt"

    def update(self, clouds: Sequence[Float[Tensor, "state _n d_model"]]) -> CloudAccumulator:
        """Fold in one batch of prompts (each its own cloud of included tokens); returns ``self``."""
        clouds = self._check_clouds(clouds, (self.n_layers, self.d_model))
        batch = self._fresh()
        for cloud in clouds:
            batch._add_prompt(cloud_grams(cloud), cloud.shape[2])
        return self._absorb(batch)

    def _check_clouds(self, clouds: Sequence[Tensor], shape: tuple[int | None, int | None]) -> list[Tensor]:
        """The clouds as a list, once each is known to be a finite float cloud of ``shape`` with at least 2 tokens."""
        if isinstance(clouds, Tensor):
            raise ArgumentError(f"{self._where()}: expected a list of per-prompt [layer, n, d_model] clouds, got one tensor")
        clouds = list(clouds)
        for i, cloud in enumerate(clouds):
            check_batch(cloud, f"{self._where()} (prompt {i} of the batch)", shape, prompt=i)
            if cloud.shape[1] < 2:
                raise ArgumentError(f"{self._where()}: prompt {i} of the batch has {cloud.shape[1]} tokens; a cloud needs 2")
            shape = (cloud.shape[0], cloud.shape[2])  # every prompt of a batch alike, too
        return clouds

    def _add_prompt(self, grams: list[Float[Tensor, "n n"]], d_model: int) -> None:
        raise NotImplementedError

    @property
    def n_prompts(self) -> int:
        return self.count


class HistogramStats(CloudAccumulator):
    """Per state, the histogram of pairwise inner products ``<x_i, x_j>`` (``i < j``) of unit vectors within each prompt.

    Bins are ``lensdyn.sphere.BINS`` (40 equal bins on [-1, 1]) unless given, and each prompt is
    binned by ``lensdyn.sphere.inner_product_histogram`` on its ``cloud_grams``, as metastability
    bins it. Two aggregations over prompts are kept:

    - ``histogram``: the mean over prompts of each prompt's normalised histogram, every prompt
      weighing the same. This is what metastability reports (``MetastabilityResult.mean("histogram")``
      averages its per-prompt ``CloudMetrics.histogram``), so this is the one equal to the analysis.
    - ``pooled_histogram``: pair counts pooled over prompts, divided by all pairs (a prompt of ``n``
      tokens weighs ``n (n - 1) / 2``): the histogram of all pairs at once.

    State: ``histogram_total = sum_p hist_p`` (float64) and ``pair_counts`` (int64, exact), both
    ``[state, bin]``, and ``n_pairs`` (pairs per state, as an int64 ``[1]`` array).

    >>> unit = torch.eye(4)[None]                                  # one state, 4 orthogonal tokens
    >>> h = HistogramStats().update([unit, 2 * unit]).histogram    # every pair at <x_i, x_j> = 0
    >>> h.shape, float(h[0, 20]), float(h.sum())                   # bin 20 is [0, 0.05)
    ((1, 40), 1.0, 1.0)
    """

    ARRAYS = ("histogram_total", "pair_counts", "n_pairs")
    INTEGER_ARRAYS = ("pair_counts", "n_pairs")
    REDUCTIONS = dict.fromkeys(ARRAYS, "sum")
    CONFIG = ("bins",)

    def __init__(self, bins: np.ndarray | None = None) -> None:
        super().__init__()
        if bins is None:
            bins = BINS
        self.bins = np.array(bins, dtype=np.float64)
        if self.bins.ndim != 1 or len(self.bins) < 2 or not np.all(np.diff(self.bins) > 0):
            raise ArgumentError("bins must be increasing edges, at least two")

    def _add_prompt(self, grams: list[Float[Tensor, "n n"]], d_model: int) -> None:
        n = grams[0].shape[0]
        pairs = n * (n - 1) // 2
        fractions = np.stack([inner_product_histogram(g, self.bins) for g in grams])  # [state, bin]
        part = HistogramStats(self.bins)
        part.n_layers, part.d_model, part.count = len(grams), d_model, 1
        part.histogram_total = fractions
        # The analysis returns counts / pairs; the counts are integers well below 2^52, so rounding recovers them exactly.
        part.pair_counts = np.rint(fractions * pairs).astype(np.int64)
        part.n_pairs = np.array([pairs], dtype=np.int64)
        self._absorb(part)

    @property
    def histogram(self) -> Float[np.ndarray, "state bin"]:
        """Mean over prompts of each prompt's fraction of pairs per bin (metastability's aggregation)."""
        self._require()
        return self.histogram_total / self.count

    @property
    def pooled_histogram(self) -> Float[np.ndarray, "state bin"]:
        """Fraction of all pairs, pooled over prompts, in each bin."""
        self._require()
        return self.pair_counts / self.n_pairs[0]


class EnergyStats(CloudAccumulator):
    """Per beta and state, the mean over prompts of the interaction energy ``E_beta`` of each prompt's cloud.

    ``E_beta = (1 / (2 beta n^2)) sum_ij exp(beta <x_i, x_j>)`` is ``lensdyn.sphere.interaction_energy``
    on its Gram matrix (as metastability computes it); betas default to ``lensdyn.sphere.BETAS``. State:
    ``energy_total = sum_p E_beta,l(p)`` (``[beta, state]``); ``mean_energy`` divides by the number of
    prompts, as ``MetastabilityResult.mean("energy")`` averages prompts.

    >>> aligned = torch.ones(1, 2, 3)                        # one state, two identical tokens
    >>> EnergyStats(betas=(1.0,)).update([aligned]).mean_energy.round(6)       # e / 2
    array([[1.359141]])
    """

    ARRAYS = ("energy_total",)
    REDUCTIONS = {"energy_total": "sum"}
    CONFIG = ("betas",)

    def __init__(self, betas: Sequence[float] | np.ndarray | None = None) -> None:
        super().__init__()
        if betas is None:
            betas = BETAS
        self.betas = tuple(float(b) for b in np.atleast_1d(np.asarray(betas, dtype=np.float64)))
        if not self.betas or not all(b > 0 for b in self.betas):
            raise ArgumentError(f"betas must be positive, got {self.betas}")

    def _add_prompt(self, grams: list[Float[Tensor, "n n"]], d_model: int) -> None:
        part = EnergyStats(self.betas)
        part.n_layers, part.d_model, part.count = len(grams), d_model, 1
        part.energy_total = np.array([[interaction_energy(g, beta) for g in grams] for beta in self.betas])
        self._absorb(part)

    @property
    def mean_energy(self) -> Float[np.ndarray, "beta state"]:
        """Mean over prompts of ``E_beta`` at each state."""
        self._require()
        return self.energy_total / self.count


_KINDS: dict[str, type[Accumulator]] = {
    cls.__name__: cls for cls in (NormStats, GainStats, CovarianceStats, FrequentDirectionsStats, RegressionStats,
                                  HistogramStats, EnergyStats)
}


# --- a named set of accumulators in one shard -----------------------------------------------


class StreamingStats:
    """A named set of accumulators, each reading named streams, updated together and saved as one shard.

    ``spec`` maps a name to ``(accumulator, source)``: a stream name for ``NormStats`` /
    ``CovarianceStats`` (read from ``packed``) and for ``HistogramStats`` / ``EnergyStats`` (read
    from ``clouds``), or ``(output_stream, reference_stream)`` for ``GainStats`` (``(x_stream, y_stream)`` for ``RegressionStats``).
    ``update_from`` checks every input before any accumulator changes; ``merge`` returns a new set;
    per-prompt Gram matrices are formed once per prompt and shared by the cloud accumulators.

    >>> stats = StreamingStats({"norms": (NormStats(), "resid"), "attn": (GainStats(), ("attn_out", "attn_in"))})
    >>> h = torch.tensor([3., 4.]).expand(3, 4, 2)                          # 3 states, 4 tokens
    >>> _ = stats.update_from({"resid": h, "attn_out": 3 * h[:2], "attn_in": h[:2]})
    >>> stats["attn"].gain()
    array([3., 3.])
    """

    def __init__(self, spec: Mapping[str, tuple[Accumulator, str | Sequence[str]]]) -> None:
        self.entries: dict[str, tuple[Accumulator, tuple[str, ...]]] = {}
        for name, (acc, source) in spec.items():
            source = (source,) if isinstance(source, str) else tuple(source)
            if not isinstance(acc, Accumulator):
                raise ArgumentError(f"{name!r}: {type(acc).__name__} is not a streaming accumulator")
            pair = isinstance(acc, (GainStats, RegressionStats))
            if len(source) != (2 if pair else 1):
                raise ArgumentError(f"{name!r}: a {type(acc).__name__} reads "
                                    + ("(output, reference) streams (x, y for a regression)" if pair else "one stream"))
            self.entries[name] = (acc, source)

    def __getitem__(self, name: str) -> Accumulator:
        return self.entries[name][0]

    def __iter__(self):
        return iter(self.entries)

    def __repr__(self) -> str:
        return "StreamingStats(" + ", ".join(f"{n}<-{'/'.join(s)}: {a!r}" for n, (a, s) in self.entries.items()) + ")"

    def update_from(
        self, packed: Mapping[str, Tensor] | None = None, clouds: Mapping[str, Sequence[Tensor]] | None = None
    ) -> StreamingStats:
        """Fold in one batch: ``packed[stream]`` is ``[state or block, token, d_model]``; ``clouds[stream]``
        lists per-prompt clouds."""
        packed, clouds = packed or {}, dict(clouds or {})
        parts: dict[str, Accumulator] = {}
        cloud_streams: dict[str, list[str]] = {}
        for name, (acc, source) in self.entries.items():
            if isinstance(acc, CloudAccumulator):
                if source[0] not in clouds:
                    raise ArgumentError(f"{name!r} reads per-prompt clouds: pass clouds={{{source[0]!r}: [...]}}")
                clouds[source[0]] = acc._check_clouds(clouds[source[0]], (acc.n_layers, acc.d_model))
                cloud_streams.setdefault(source[0], []).append(name)
                parts[name] = acc._blank_like()
                continue
            missing = [s for s in source if s not in packed]
            if missing:
                raise ArgumentError(f"{name!r} reads stream(s) {missing} that this batch does not hold")
            # Each batch goes into a blank of the same shape first: nothing changes unless every input passes.
            parts[name] = acc._blank_like().update(*(packed[s] for s in source))
        for stream, names in cloud_streams.items():
            for cloud in clouds[stream]:
                grams = cloud_grams(cloud)
                for name in names:
                    parts[name]._add_prompt(grams, cloud.shape[2])
        for name, part in parts.items():
            self.entries[name][0]._absorb(part)
        return self

    def update_from_capture(self, cap, extra: Mapping[str, Tensor] | None = None) -> StreamingStats:
        """Fold in a whole ``Capture``: packed streams are its tokens under ``cap.mask``, clouds each prompt's
        included tokens. ``extra`` holds packed streams derived from those tokens (e.g. the residual through a
        metric), read by name like the captured ones."""
        extra = dict(extra or {})
        packed_names = {s for acc, source in self.entries.values() if not isinstance(acc, CloudAccumulator)
                        for s in source} - set(extra)
        cloud_names = {source[0] for acc, source in self.entries.values() if isinstance(acc, CloudAccumulator)}
        cap.require_streams(sorted(packed_names | cloud_names))
        packed = {s: cap.tokens_of(s) for s in packed_names} | extra
        clouds = {s: [cap.tokens_of(s, prompt=p) for p in range(cap.n_prompts)] for s in cloud_names}
        return self.update_from(packed, clouds)

    def merge(self, other: StreamingStats) -> StreamingStats:
        """A new set holding both shards; names and sources must agree."""
        if self.entries.keys() != other.entries.keys():
            raise ArgumentError(f"cannot merge shards holding {sorted(self.entries)} and {sorted(other.entries)}")
        spec = {}
        for name, (acc, source) in self.entries.items():
            other_acc, other_source = other.entries[name]
            if source != other_source:
                raise ArgumentError(f"{name!r} reads {source} in one shard and {other_source} in the other")
            spec[name] = (acc.merge(other_acc), source)
        return StreamingStats(spec)

    def to_dict(self) -> dict:
        return {
            "kind": "StreamingStats",
            "entries": {name: {"source": list(source), "stats": acc.to_dict()} for name, (acc, source) in self.entries.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> StreamingStats:
        if str(data.get("kind")) != "StreamingStats":
            raise ArgumentError(f"StreamingStats.from_dict got a {data.get('kind')!r} record")
        return cls({
            name: (Accumulator.from_dict(entry["stats"]), tuple(str(s) for s in np.atleast_1d(entry["source"])))
            for name, entry in data["entries"].items()
        })

    def save(self, path: str | Path) -> Path:
        return save(self, path)


# --- shards on disk -------------------------------------------------------------------------


def merge_all(shards: Iterable[Accumulator | StreamingStats]) -> Accumulator | StreamingStats:
    """``shards[0].merge(shards[1]).merge(...)``: every shard folded into one.

    >>> x = torch.randn(2, 6, 3)
    >>> merged = merge_all(NormStats().update(x[:, i : i + 2]) for i in range(0, 6, 2))
    >>> merged.count
    6
    """
    shards = list(shards)
    if not shards:
        raise ArgumentError("merge_all needs at least one shard")
    return functools.reduce(lambda a, b: a.merge(b), shards)


# --- across torch.distributed ranks ---------------------------------------------------------


def reduce_across_ranks(stats: StreamingStats | Accumulator, group=None) -> StreamingStats | Accumulator | None:
    """Every rank's shard merged onto rank 0 with ``torch.distributed``; ``None`` on the other ranks.

    Collective: every rank of ``group`` (default: the world) calls it with accumulators of the same
    names and kinds. Driven by what each accumulator declares, not by its class: a plain one
    (``REDUCTIONS`` covers its arrays) is reduced with one ``reduce`` per array (SUM/MIN/MAX, float64
    or int64 tensors; an empty rank sends the operation's identity); any other (a Chan-rule merge,
    a sketch) is sent whole to rank 0, one rank after another, and merged there in rank order:
    exactly ``merge_all`` over the ranks' shards, holding two shards at a time rather than all of them.
    A rank whose accumulators do not match rank 0's (kind, configuration, shapes) is an error raised
    on every rank, before any array moves. Tensors live on the current CUDA device under NCCL.
    """
    import torch.distributed as dist

    single = isinstance(stats, Accumulator)
    entries = {"": stats} if single else {name: stats[name] for name in stats}
    sources = {} if single else {name: stats.entries[name][1] for name in stats}
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    described = [None] * world
    dist.all_gather_object(described, {name: _describe(acc) for name, acc in entries.items()} | {"/sources": sources},
                           group=group)
    _check_ranks_agree(described)
    merged = {name: (_reduce_plain if acc.plain() else _reduce_in_order)(acc, [d[name] for d in described], rank,
                                                                          device, group)
              for name, acc in entries.items()}
    if rank != 0:
        return None
    if single:
        return merged[""]
    return StreamingStats({name: (merged[name], sources[name]) for name in entries})


def _describe(acc: Accumulator) -> dict:
    """What rank 0 needs to know of a rank's accumulator before its arrays move: kind, config, count, shapes."""
    return {"kind": type(acc).__name__, "config": {n: np.asarray(getattr(acc, n)).tolist() for n in acc.CONFIG},
            "count": int(acc.count), "n_layers": acc.n_layers, "d_model": acc.d_model,
            "shapes": {n: tuple(getattr(acc, n).shape) for n in acc.ARRAYS} if not acc.empty else None}


def _check_ranks_agree(described: list[dict]) -> None:
    first = described[0]
    for rank, theirs in enumerate(described[1:], start=1):
        if theirs.keys() != first.keys() or theirs["/sources"] != first["/sources"]:
            raise ArgumentError(f"rank {rank} holds accumulators {sorted(theirs)} reading {theirs['/sources']}, "
                                f"rank 0 {sorted(first)} reading {first['/sources']}")
        for name in first:
            if name == "/sources":
                continue
            a, b = first[name], theirs[name]
            shapes = [d for d in (a, b) if d["shapes"] is not None]
            if (a["kind"], a["config"]) != (b["kind"], b["config"]) or (
                    len(shapes) == 2 and shapes[0]["shapes"] != shapes[1]["shapes"]):
                raise ArgumentError(f"rank {rank}'s {name or 'accumulator'} ({b['kind']}, {b['config']}, shapes "
                                    f"{b['shapes']}) does not match rank 0's ({a['kind']}, {a['config']}, {a['shapes']})")


def _as_tensor(value: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(value)).to(device)


def _identity(op: str, dtype: np.dtype) -> float | int:
    """What an empty rank contributes to a reduction: 0 to a sum, the largest value to a min, the smallest to a max."""
    if op == "sum":
        return 0
    big = np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max
    return big if op == "min" else -big


def _reduce_plain(acc: Accumulator, described: list[dict], rank: int, device, group) -> Accumulator | None:
    import torch.distributed as dist

    full = [d for d in described if d["shapes"] is not None]
    out = acc._fresh()
    if not full:
        return out if rank == 0 else None
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    out.n_layers, out.d_model, out.count = full[0]["n_layers"], full[0]["d_model"], sum(d["count"] for d in described)
    for name in acc.ARRAYS:
        dtype = np.int64 if name in acc.INTEGER_ARRAYS else np.float64
        op = acc.REDUCTIONS[name]
        local = getattr(acc, name) if not acc.empty else np.full(full[0]["shapes"][name], _identity(op, dtype), dtype)
        tensor = _as_tensor(local.astype(dtype, copy=True), device)
        dist.reduce(tensor, dst=0, op=ops[op], group=group)
        setattr(out, name, _numpy(tensor))
    return out if rank == 0 else None


def _reduce_in_order(acc: Accumulator, described: list[dict], rank: int, device, group) -> Accumulator | None:
    import torch.distributed as dist

    merged = acc.copy() if rank == 0 else None
    for source, theirs in enumerate(described[1:], start=1):
        if theirs["shapes"] is None:  # that rank streamed nothing: the merge's identity
            continue
        if rank == source:
            for name in acc.ARRAYS:
                dist.send(_as_tensor(getattr(acc, name), device), dst=0, group=group)
        elif rank == 0:
            part = acc._fresh()
            part.n_layers, part.d_model, part.count = theirs["n_layers"], theirs["d_model"], theirs["count"]
            for name in acc.ARRAYS:
                dtype = torch.int64 if name in acc.INTEGER_ARRAYS else torch.float64
                buffer = torch.empty(theirs["shapes"][name], dtype=dtype, device=device)
                dist.recv(buffer, src=source, group=group)
                setattr(part, name, _numpy(buffer))
            merged = merged.merge(part)
    return merged


def _flatten(data: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in data.items():
        if "/" in key:
            raise ArgumentError(f"a name may not contain '/': {key!r}")
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value.item() if value.ndim == 0 else value
    return out


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def save(stats: Accumulator | StreamingStats, path: str | Path) -> Path:
    """Write an accumulator or a ``StreamingStats`` shard: ``.npz`` (``numpy.savez``) or ``.json``; both exact in float64.

    JSON writes each float64 by its shortest round-trip repr, so ``load`` restores every bit.
    """
    path = Path(path)
    record = {"format": FORMAT, "stats": stats.to_dict()}
    if path.suffix == ".npz":
        np.savez(path, **_flatten(record))
    elif path.suffix == ".json":
        path.write_text(json.dumps(_plain(record)))
    else:
        raise ArgumentError(f"save writes .npz or .json, not {path.suffix or 'a path without suffix'!r}")
    return path


def load(path: str | Path) -> Accumulator | StreamingStats:
    """Read what ``save`` wrote (an accumulator or a ``StreamingStats``)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            record = _unflatten({key: data[key] for key in data.files})
    elif path.suffix == ".json":
        record = json.loads(path.read_text())
    else:
        raise ArgumentError(f"load reads .npz or .json, not {path.suffix or 'a path without suffix'!r}")
    if record.get("format") != FORMAT:
        raise ArgumentError(f"{path} is not a lensdyn streaming shard (format {record.get('format')!r})")
    stats = record["stats"]
    if stats.get("kind") == "StreamingStats":
        return StreamingStats.from_dict(stats)
    return Accumulator.from_dict(stats)
