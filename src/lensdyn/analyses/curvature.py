"""Curvature and deflection of token trajectories through the blocks (arXiv 2511.03060, defined here).

The paper's code and exact definitions are not public; lensdyn's are these. A token's trajectory
is its states ``x_0..x_L`` (``lensdyn.conventions`` 1: ``x_L`` is before the final norm), in the raw
residual stream or projected to the sphere (``x_l / ||x_l||``). Steps ``d_l = x_{l+1} - x_l``.

- ``turning_angles``: ``theta_l = arccos(<d_l, d_{l+1}> / (||d_l|| ||d_{l+1}||))`` in degrees, one
  per interior state and token: the curvature landscape. ``sharp``: ``theta >= SHARP`` (120),
  ``flat``: ``theta <= FLAT`` (60).
- ``length_to_chord = sum_l ||d_l|| / ||x_L - x_0||`` (1 for a straight line).
- nulls with the same step lengths: ``walk``, steps in isotropic random directions of
  ``d_model`` dimensions; ``shuffle``, the token's own steps in a random block order. Every
  statistic is a function of the inner products of a token's ``k = L`` steps, so both nulls run
  on ``k`` exact coordinates per token (``step_coordinates``), the walk's directions drawn there
  by the Bartlett decomposition (``null_steps``): ``k(k+1)/2`` draws per token, not ``k d_model``. Each
  statistic (mean angle, sharp and flat fractions, mean length-to-chord) is compared with its
  null draws: ``p`` is the one-sided permutation p-value ``(1 + #{null >= observed}) / (1 + n)``
  (``<=`` for the flat fraction, where "more bent" means fewer flat angles), and the effect size is
  ``(observed - null mean) / null std``. Norm growth alone bends nothing, so both the raw and the
  sphere-projected stream are reported.
- ``deflection`` of an edit, at the target (the last non-special token, shared by the clean and
  the edited prompt; output quantities need a causal LM and are NaN for encoders): per state
  the distance ``||c_l - e_l||``, the angle between ``c_l`` and ``e_l``, the angle between their
  steps, and ``part_layer``, the first state where the angle exceeds ``PART_ANGLE`` (5 degrees).
  Meaning-changing edits are compared with control edits by a Mann-Whitney U test on the final
  angle and on the output KL.
- patched-context runs (every edit pair's prompts in one capture, every pair's sweep in one batch):
  the logit difference ``LD = logit(clean answer) - logit(edited answer)`` at the target;
  patching the edited run's activation at the target into the clean run at block ``l`` gives
  ``recovery[l] = (LD_patched - LD_clean) / (LD_edited - LD_clean)`` (1: that block's state
  carries the whole edit to the output).

>>> result = curvature.measure(ld.load_model("smollm2-135m"))      # doctest: +SKIP
>>> print(result.summary())                                         # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from lensdyn import citations, plots
from lensdyn.errors import ArgumentError, PromptError
from lensdyn.hooks.capture import Capture, capture
from lensdyn.hooks.patching import PATCH_HOOKS, align, final_logits, patch_sweeps
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.models import text_token_ids
from lensdyn.ops import prompt_index, to_numpy
from lensdyn.resampling import prompt_counts, resampled_tokens
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.verdicts import Claim, finite

STREAMS = ("resid",)
SHARP, FLAT, PART_ANGLE = 120.0, 60.0, 5.0


# --- edit pairs (the built-in deflection and patching prompts) ------------------------------


@dataclass(frozen=True)
class EditPair:
    """A clean prompt and an edited one that differ in one span before the last token (the target).

    ``kind="meaning"``: the edit changes the meaning the target's continuation depends on, and
    ``clean_answer`` / ``edited_answer`` are the continuations each context calls for.
    ``kind="control"``: the edit keeps the meaning (a synonym, punctuation); both answers agree.
    """

    label: str
    kind: str
    clean: str
    edited: str
    clean_answer: str
    edited_answer: str


# Written for lensdyn. Every edit precedes the final token, which is shared by both prompts.
EDIT_PAIRS: tuple[EditPair, ...] = (
    EditPair("weather", "meaning", "It was freezing outside, so before leaving she put on her",
             "It was scorching outside, so before leaving she put on her", " coat", " sunglasses"),
    EditPair("pet", "meaning", "Every morning my cat likes to chase the", "Every morning my dog likes to chase the",
             " mouse", " ball"),
    EditPair("capital", "meaning", "In Paris, the capital of France, most people speak",
             "In Berlin, the capital of Germany, most people speak", " French", " German"),
    EditPair("taste", "meaning", "She bit into the lemon and it tasted very", "She bit into the cake and it tasted very",
             " sour", " sweet"),
    EditPair("mood", "meaning", "The news made him so happy that he started to", "The news made him so sad that he started to",
             " laugh", " cry"),
    EditPair("river", "meaning", "The lake was frozen solid, so the children went",
             "The lake was warm and calm, so the children went",
             " skating", " swimming"),
    EditPair("fall", "meaning", "She dropped the glass on the tiles and it", "She dropped the pillow on the tiles and it",
             " shattered", " landed"),
    EditPair("sky", "meaning", "At midnight, when you look up, the sky is", "At midday, when you look up, the sky is",
             " dark", " blue"),
    EditPair("weather-synonym", "control", "It was freezing outside, so before leaving she put on her",
             "It was icy cold outside, so before leaving she put on her", " coat", " coat"),
    EditPair("pet-synonym", "control", "Every morning my cat likes to chase the", "Every morning my kitten likes to chase the",
             " mouse", " mouse"),
    EditPair("mood-comma", "control", "The news made him so happy that he started to",
             "The news made him so happy, that he started to",
             " laugh", " laugh"),
    EditPair("fall-comma", "control", "She dropped the glass on the tiles and it", "She dropped the glass on the tiles, and it",
             " shattered", " shattered"),
    EditPair("sky-comma", "control", "At midnight, when you look up, the sky is", "At midnight when you look up the sky is",
             " dark", " dark"),
    EditPair("river-synonym", "control", "The lake was frozen solid, so the children went",
             "The pond was frozen solid, so the children went",
             " skating", " skating"),
)


# --- pure functions of trajectories -------------------------------------------------------


def _angle(a: Tensor, b: Tensor) -> Tensor:
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def turning_angles(states: Float[Tensor, "state *token d_model"]) -> Float[Tensor, "interior *token"]:  # noqa: F821
    """Angle in degrees between consecutive steps, at every interior state (in the states' dtype).

    >>> t = torch.tensor([[0., 0.], [1., 0.], [1., 1.], [0., 1.]])       # two right turns
    >>> turning_angles(t)
    tensor([90., 90.])
    """
    d = torch.diff(states, dim=0)
    return _angle(d[:-1], d[1:])


def length_to_chord(states: Float[Tensor, "state *token d_model"]) -> Float[Tensor, "*token"]:
    """``sum_l ||x_{l+1} - x_l|| / ||x_L - x_0||``.

    >>> length_to_chord(torch.tensor([[0., 0.], [1., 0.], [1., 1.]])).item()     # two sides over the diagonal
    1.4142135381698608
    """
    return _step_chord(torch.diff(states, dim=0))


def _step_chord(d: Tensor) -> Tensor:
    return d.norm(dim=-1).sum(0) / d.sum(0).norm(dim=-1)


def token_statistics(steps: Float[Tensor, "block token d_model"]) -> dict[str, Float[Tensor, " token"]]:
    """Per trajectory: mean turning angle, sharp and flat fractions of its turns, and length-to-chord.

    Angles are computed in the steps' dtype (``compare_with_nulls`` passes float64 coordinates);
    the values are float64. Every trajectory has the same number of turns, so the mean over
    trajectories of a per-trajectory fraction is the fraction of all turns pooled.

    >>> steps = torch.tensor([[[1., 0.]], [[0., 1.]], [[-1., 0.]]])      # two right turns of one token
    >>> {k: round(float(v), 4) for k, v in token_statistics(steps).items()}
    {'mean_angle': 90.0, 'sharp_fraction': 0.0, 'flat_fraction': 0.0, 'length_to_chord': 3.0}
    """
    angles = _angle(steps[:-1], steps[1:]).to(torch.float64)
    return {
        "mean_angle": angles.mean(0),
        "sharp_fraction": (angles >= SHARP).to(torch.float64).mean(0),
        "flat_fraction": (angles <= FLAT).to(torch.float64).mean(0),
        "length_to_chord": _step_chord(steps).to(torch.float64),
    }


def step_statistics(steps: Float[Tensor, "block token d_model"]) -> dict[str, float]:
    """``token_statistics`` averaged over trajectories (float64)."""
    return {name: float(values.mean()) for name, values in token_statistics(steps).items()}


def null_p_value(null: Float[np.ndarray, " draw"], observed: float, lower: bool = False) -> float:
    """One-sided p of ``observed`` against null draws, ``(1 + #extreme) / (1 + n)``, ties counted as extreme.

    Extreme is ``>=`` (``lower``: ``<=``). Ties count because the shuffle's chord equals the
    observed one up to summation order.

    >>> null_p_value(np.array([0.1, 0.2, 0.5]), 0.4)
    0.5
    """
    tie = np.isclose(null, observed, rtol=1e-9, atol=0.0)
    extreme = (null <= observed if lower else null >= observed) | tie
    return float((1 + extreme.sum()) / (1 + len(null)))


def step_coordinates(steps: Float[Tensor, "block token d_model"]) -> Float[Tensor, "block token coord"]:
    """Each token's steps in an orthonormal basis of their span (float64): every inner product, in ``min(k, d_model)`` numbers.

    For one token with steps ``d_1..d_k`` as the columns of ``A`` (``d_model x k``), ``A = Q R``
    with orthonormal ``Q`` gives ``<d_i, d_j> = (A^T A)_ij = (R^T R)_ij``: row ``i`` of ``R^T`` is
    step ``i`` in coordinates. ``R^T`` is the Cholesky factor of the Gram matrix ``A^T A``, which
    is how it is computed (a ``k x k`` factorisation per token); a token whose steps are linearly
    dependent (Gram matrix singular) gets it from the QR of ``A`` instead. Cholesky is backward
    stable, so the coordinates' inner products match the steps' to float64 round-off of
    ``||d_i|| ||d_j||``. With ``d_model <= k`` the steps are returned as they are (in float64).

        steps [k, token, d_model] -> coordinates [k, token, k]: <c_i, c_j> = <d_i, d_j> per token

    >>> steps = torch.tensor([[[0., 3., 0., 0.]], [[0., 4., 0., 5.]]])     # 2 steps of 1 token in 4 dimensions
    >>> step_coordinates(steps)                                           # lengths 3 and sqrt(41), inner product 12
    tensor([[[3., 0.]],
    <BLANKLINE>
            [[4., 5.]]], dtype=torch.float64)
    """
    k, _, d = steps.shape
    x = steps.to(torch.float64)
    if d <= k:
        return x
    a = x.permute(1, 0, 2)  # [token, k, d]: row i of a[t] is step i
    lower, info = torch.linalg.cholesky_ex(a @ a.mT)
    dependent = info != 0
    if dependent.any():
        lower[dependent] = torch.linalg.qr(a[dependent].mT, mode="r").R.mT
    return lower.permute(1, 0, 2)


def null_steps(
    steps: Float[Tensor, "block token coord"], kind: str, generator: torch.Generator, dim: int | None = None
) -> Float[Tensor, "block token coord"]:
    """Null steps with the same lengths: ``"walk"`` (isotropic directions) or ``"shuffle"`` (the token's own, reordered).

    ``steps`` are vectors of ``dim`` dimensions (default: their own last axis) given by their
    coordinates in an orthonormal basis, as ``step_coordinates`` returns them; the null steps
    are given the same way. Shuffling keeps the chord (a sum of the same steps), so its
    length-to-chord equals the observed one.

    Walk with ``dim`` larger than the coordinates (the Bartlett decomposition): ``k`` independent
    ``N(0, I_dim)`` vectors ``g_0..g_{k-1}``, written in the Gram-Schmidt basis ``q_0..q_{k-1}``
    they span, are the rows of a lower-triangular ``L`` with independent entries

        L[i, j] = <g_i, q_j> ~ N(0, 1)  (j < i),   L[i, i] = ||g_i - sum_{j<i} L[i, j] q_j|| ~ sqrt(chi2(dim - i))

    (given ``g_0..g_{i-1}``, ``g_i`` is still standard normal: ``i`` independent coordinates on
    their span and a ``dim - i``-dimensional remainder). A row of ``L`` normalised to length one
    is a uniform direction, and the rows' inner products are those of the ``g``, so the
    statistics of ``dim``-dimensional walks come from ``k(k+1)/2`` draws per token instead of
    ``k dim``. Rows are padded with zeros to the coordinates' width. ``L`` is drawn by numpy
    (torch has no public seeded chi-square sampler), seeded from ``generator``. Every draw is made on
    the CPU (``generator`` is a CPU generator) and moved to ``steps``' device: a seed gives the same
    nulls on every device.

        steps [k, token, k] (coordinates), dim = 576 -> L [token, k, k] -> rows / ||rows|| * ||steps||

    >>> g = torch.Generator().manual_seed(0)
    >>> steps = torch.tensor([[[3., 0.]], [[4., 5.]]], dtype=torch.float64)   # 2 steps of 1 token, in coordinates
    >>> null = null_steps(steps, "walk", g, dim=576)                          # directions drawn in 576 dimensions
    >>> null.norm(dim=-1).squeeze(-1).round(decimals=6)                       # lengths kept: 3 and sqrt(41)
    tensor([3.0000, 6.4031], dtype=torch.float64)
    """
    if kind == "walk":
        k, n_tokens, width = steps.shape
        dim = width if dim is None else dim
        if dim < width:
            raise ArgumentError(f"dim {dim} is smaller than the {width} coordinates of the steps")
        if dim == width:
            directions = torch.randn(steps.shape, generator=generator, dtype=steps.dtype).to(steps.device)
        elif width < k:
            raise ArgumentError(f"{k} steps in {dim} dimensions need {k} coordinates, not {width}")
        else:
            lower = _bartlett(n_tokens, k, dim, generator).to(steps.device, steps.dtype)
            directions = torch.nn.functional.pad(lower, (0, width - k))
        return directions * (steps.norm(dim=-1, keepdim=True) / directions.norm(dim=-1, keepdim=True))
    if kind == "shuffle":
        order = torch.argsort(torch.rand(steps.shape[:2], generator=generator), dim=0).to(steps.device)
        return torch.gather(steps, 0, order[..., None].expand_as(steps))
    raise ArgumentError(f"null kind must be 'walk' or 'shuffle', not {kind!r}")


def _bartlett(n_tokens: int, k: int, dim: int, generator: torch.Generator) -> Float[Tensor, "block token block"]:
    """Per token ``t``, ``k`` standard normal vectors of ``dim`` dimensions in the basis they span: ``out[i, t] = L_t[i]``."""
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
    rows, cols = np.tril_indices(k, -1)
    lower = np.zeros((n_tokens, k * k))
    lower[:, rows * k + cols] = rng.standard_normal((n_tokens, len(rows)))
    lower[:, np.arange(k) * (k + 1)] = np.sqrt(rng.chisquare(dim - np.arange(k), (n_tokens, k)))
    return torch.from_numpy(lower.reshape(n_tokens, k, k)).permute(1, 0, 2)


@dataclass(frozen=True)
class NullComparison:
    """One statistic of the observed trajectories against one null."""

    statistic: str
    null: str
    observed: float
    null_mean: float
    null_std: float
    p_value: float
    effect_size: float
    null_draws: Float[np.ndarray, " draw"] | None = None


def compare_with_nulls(
    states: Float[Tensor, "state token d_model"], n_draws: int = 20, seed: int = 0
) -> tuple[NullComparison, ...]:
    """Every statistic of ``step_statistics`` against both nulls (module docstring), on the steps' exact coordinates."""
    return compare_steps_with_nulls(step_coordinates(torch.diff(states.to(torch.float64), dim=0)), states.shape[-1],
                                    n_draws, seed)


def compare_steps_with_nulls(
    steps: Float[Tensor, "block token coord"], dim: int, n_draws: int = 20, seed: int = 0
) -> tuple[NullComparison, ...]:
    """``compare_with_nulls`` on steps already in coordinates (``step_coordinates``) of ``dim``-dimensional states."""
    observed = step_statistics(steps)
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind in ("walk", "shuffle"):
        draws = [step_statistics(null_steps(steps, kind, g, dim=dim)) for _ in range(n_draws)]
        for name, value in observed.items():
            null = np.array([d[name] for d in draws])
            std = float(null.std(ddof=1))
            out.append(NullComparison(
                statistic=name, null=kind, observed=value, null_mean=float(null.mean()), null_std=std,
                p_value=null_p_value(null, value, lower=name == "flat_fraction"),
                effect_size=float((value - null.mean()) / std) if std > 0 else float("nan"), null_draws=null,
            ))
    return tuple(out)


@dataclass(frozen=True)
class Deflection:
    """How an edit moves the target token's trajectory, and which blocks carry it to the output."""

    label: str
    kind: str
    distance: Float[np.ndarray, " state"]
    angle: Float[np.ndarray, " state"]  # degrees between clean and edited states
    step_angle: Float[np.ndarray, " block"]  # degrees between clean and edited steps
    part_layer: int  # first state with angle > PART_ANGLE; -1 if never
    final_angle: float
    output_kl: float  # KL(clean || edited) of the next-token distribution at the target
    ld_clean: float
    ld_edited: float
    recovery: dict[str, Float[np.ndarray, " block"]]  # stream -> (LD_patched - LD_clean) / (LD_edited - LD_clean)


def deflection_profile(
    clean: Float[Tensor, "state d_model"], edited: Float[Tensor, "state d_model"]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(distance, angle, step_angle, part_layer)`` of two trajectories of one token.

    >>> c = torch.tensor([[1., 0.], [2., 0.], [3., 0.]]); e = torch.tensor([[1., 0.], [2., 0.], [3., 3.]])
    >>> deflection_profile(c, e)[3]
    2
    """
    c, e = clean.to(torch.float64), edited.to(torch.float64)
    angle = to_numpy(_angle(c, e))
    parted = np.nonzero(angle > PART_ANGLE)[0]
    return to_numpy((c - e).norm(dim=-1)), angle, to_numpy(_angle(torch.diff(c, dim=0), torch.diff(e, dim=0))), (
        int(parted[0]) if len(parted) else -1
    )


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Landscape:
    """One prompt's curvature landscape: the raw stream's turning angle (degrees) per interior state and token."""

    prompt: str
    tokens: tuple[str, ...]  # its included tokens
    angles: Float[np.ndarray, "interior pos"]


@dataclass(frozen=True, eq=False)
class CurvatureResult(Result):
    """Trajectory curvature against nulls (raw and sphere), a landscape, and deflection under edits."""

    raw: tuple[NullComparison, ...]
    sphere: tuple[NullComparison, ...]
    landscapes: tuple[Landscape, ...]  # one per prompt, the longest first (the figure's default)
    deflections: tuple[Deflection, ...]
    final_angle_meaning: float  # mean over meaning-changing edits
    final_angle_control: float
    final_angle_p: float  # Mann-Whitney U, one-sided: meaning > control
    output_kl_meaning: float
    output_kl_control: float
    output_kl_p: float
    control: "CurvatureResult | None" = None
    # Per included token of the raw stream (token_statistics), and its prompt: what a resample redraws.
    raw_token_statistics: dict[str, Float[np.ndarray, " token"]] | None = None
    token_prompt: Int[np.ndarray, " token"] | None = None

    def resample(self, rng: np.random.Generator) -> "CurvatureResult | None":
        """The claims' statistics on a resample: prompts drawn with replacement for the raw-stream
        comparisons (against the nulls as drawn), and edit pairs drawn with replacement within each
        kind for the deflection test. None without the per-token data (a result read from JSON)."""
        if self.raw_token_statistics is None or self.token_prompt is None:
            return None
        drawn = resampled_tokens(self.token_prompt, prompt_counts(rng, self.provenance.n_prompts))
        raw = []
        for c in self.raw:
            if c.null_draws is None or c.statistic not in self.raw_token_statistics:
                raw.append(c)
                continue
            value = float(self.raw_token_statistics[c.statistic][drawn].mean())
            raw.append(dataclasses.replace(c, observed=value,
                                           p_value=null_p_value(c.null_draws, value, lower=c.statistic == "flat_fraction")))
        kinds = {kind: [d for d in self.deflections if d.kind == kind] for kind in ("meaning", "control")}
        drawn_pairs = {kind: [group[i] for i in rng.integers(len(group), size=len(group))] if group else []
                       for kind, group in kinds.items()}
        angles = {kind: [d.final_angle for d in group] for kind, group in drawn_pairs.items()}
        return dataclasses.replace(
            self, raw=tuple(raw), deflections=tuple(drawn_pairs["meaning"] + drawn_pairs["control"]),
            final_angle_meaning=float(np.mean(angles["meaning"])) if angles["meaning"] else float("nan"),
            final_angle_control=float(np.mean(angles["control"])) if angles["control"] else float("nan"),
            final_angle_p=_one_sided(angles["meaning"], angles["control"]),
            raw_token_statistics=None, token_prompt=None,
        )


    def comparison(self, space: str, statistic: str, null: str) -> NullComparison:
        return next(c for c in getattr(self, space) if c.statistic == statistic and c.null == null)

    def summary(self) -> str:
        p = self.provenance
        lines = [f"Curvature: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, {p.n_tokens} tokens",
                 f"{'space':7}{'statistic':17}{'observed':>10}{'walk null':>11}{'p':>7}{'effect':>8}"
                 f"{'shuffle null':>14}{'p':>7}{'effect':>8}{'control obs.':>14}"]
        for space in ("raw", "sphere"):
            for stat in ("mean_angle", "sharp_fraction", "flat_fraction", "length_to_chord"):
                w, s = self.comparison(space, stat, "walk"), self.comparison(space, stat, "shuffle")
                ctrl = f"{self.control.comparison(space, stat, 'walk').observed:>14.3f}" if self.control else ""
                lines.append(f"{space:7}{stat:17}{w.observed:>10.3f}{w.null_mean:>11.3f}{w.p_value:>7.3f}{w.effect_size:>8.1f}"
                             f"{s.null_mean:>14.3f}{s.p_value:>7.3f}{s.effect_size:>8.1f}{ctrl}")
        lines.append("edits (target = last non-special token; part = first state > 5 degrees apart):")
        lines.append(f"  {'label':18}{'kind':9}{'part':>5}{'final angle':>12}{'KL':>8}{'LD clean':>10}{'LD edited':>10}"
                     f"{'best resid block (recovery)':>30}")
        for d in self.deflections:
            rec = d.recovery.get("resid")
            best = f"{int(np.argmax(rec))} ({rec.max():.2f})" if rec is not None and len(rec) else "-"
            lines.append(f"  {d.label:18}{d.kind:9}{d.part_layer:>5}{d.final_angle:>12.1f}{d.output_kl:>8.3f}"
                         f"{d.ld_clean:>10.2f}{d.ld_edited:>10.2f}{best:>30}")
        lines.append(f"meaning vs control edits: final angle {self.final_angle_meaning:.1f} vs "
                     f"{self.final_angle_control:.1f} deg "
                     f"(Mann-Whitney p {self.final_angle_p:.3g}); output KL {self.output_kl_meaning:.3f} vs "
                     f"{self.output_kl_control:.3f} (p {self.output_kl_p:.3g})")
        return "\n".join(lines)

    def figure(self):
        """The curvature landscape of one prompt at a time (a dropdown picks it; the longest first), deflection
        angle per state, and patching recovery per block; legends beside their panels, the colour bar above
        the landscape's legend-free panel."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=3, cols=1, vertical_spacing=0.12, row_heights=[0.4, 0.3, 0.3], subplot_titles=(
            "turning angle per state and token (position:text; pick the prompt at the top right)",
            "angle between clean and edited target states (meaning edits solid, control dotted)",
            "patching recovery of the logit difference, resid at block l (meaning edits)"))
        for i, land in enumerate(self.landscapes):
            fig.add_trace(go.Heatmap(
                # The position keeps each label unique (a category axis merges equal ones); cut, it fits under the panel.
                z=land.angles, x=[f"{j}:{t[:10]}" for j, t in enumerate(land.tokens)], y=np.arange(1, land.angles.shape[0] + 1),
                colorscale="RdBu_r", zmid=90, zmin=0, zmax=180, name=land.prompt, visible=i == 0,
                colorbar={"title": {"text": "deg", "side": "right"}, "len": 0.3, "y": 1.0, "yanchor": "top",
                          "x": 1.02, "thickness": 14},
                hovertemplate=f"{land.prompt}<br>state %{{y}}, token %{{x}}: %{{z:.1f}} deg<extra></extra>"), row=1, col=1)
        for d in self.deflections:
            dash = "solid" if d.kind == "meaning" else "dot"
            fig.add_trace(go.Scatter(y=d.angle, mode="lines", line={"dash": dash}, name=f"{d.kind}: {d.label}",
                                     legend="legend"), row=2, col=1)
            if d.kind == "meaning" and "resid" in d.recovery:
                fig.add_trace(go.Scatter(y=d.recovery["resid"], mode="lines+markers", name=d.label,
                                         legend="legend2"), row=3, col=1)
        if not any(d.kind == "meaning" and "resid" in d.recovery for d in self.deflections):
            fig.add_annotation(text="no patching recovery measured on this run", showarrow=False, row=3, col=1,
                               x=0.5, y=0.5, xref="x3 domain", yref="y3 domain")
        fig.update_xaxes(tickangle=-60, tickfont={"size": 9}, row=1, col=1)
        fig.update_yaxes(title_text="state l", row=1, col=1)
        fig.update_xaxes(title_text="state l", row=2, col=1)
        fig.update_yaxes(title_text="angle (degrees)", row=2, col=1)
        fig.update_xaxes(title_text="block l", row=3, col=1)
        fig.update_yaxes(title_text="recovered share of LD change", row=3, col=1)
        plots.shrink_subplot_titles(fig)
        beside = {"x": 1.02, "xanchor": "left", "yanchor": "top", "font": {"size": 10}}
        menu = plots.prompt_menu([land.prompt for land in self.landscapes], len(fig.data), first=0,
                                 x=1, xanchor="right", y=1.035, yanchor="bottom")
        fig.update_layout(title=f"Curvature and deflection: {self.provenance.model} ({self.provenance.weights})",
                          template="plotly_white", height=1250, margin={"r": 20, "t": 130},
                          legend={**beside, "y": 0.52, "title": {"text": "edit pair (angle)"}},
                          legend2={**beside, "y": 0.22, "title": {"text": "edit pair (recovery)"}},
                          updatemenus=[menu] if len(self.landscapes) > 1 else [])
        return fig


CURVATURE = citations.CURVATURE.source


SHARP_FLOOR = 0.01  # excess sharp turns below one in a hundred turns are negligible
CHORD_FLOOR = 0.1  # trajectories at least 10% longer (relative to the chord) than the walk's
# Vargha and Delaney (2000): A = P(meaning > control) of 0.56 is a "small" effect; below it, negligible.
DEFLECTION_FLOOR = 0.56


def _beats_walk(statistic: str):
    def test(r) -> tuple[str, bool | None]:
        c = r.comparison("raw", statistic, "walk")
        return f"{c.observed:.3g} vs walk {c.null_mean:.3g} (p {c.p_value:.2g})", finite(True, c.observed, c.null_mean)
    return test


def _walk_p(statistic: str):
    def p_value(r) -> tuple[float, int | None]:
        c = r.comparison("raw", statistic, "walk")
        return c.p_value, None if c.null_draws is None else len(c.null_draws)
    return p_value


def _sharp_excess(r) -> float:
    c = r.comparison("raw", "sharp_fraction", "walk")
    return c.observed - c.null_mean


def _chord_excess(r) -> float:
    c = r.comparison("raw", "length_to_chord", "walk")
    return c.observed / c.null_mean - 1


def _deflects(r) -> tuple[str, bool | None]:
    measured = f"{r.final_angle_meaning:.1f} vs {r.final_angle_control:.1f} deg (p {r.final_angle_p:.2g})"
    return measured, finite(True, r.final_angle_p)


def _vargha_delaney(r) -> float:
    """``A = P(meaning angle > control angle) + P(tie) / 2`` over the result's pairs."""
    meaning = np.array([d.final_angle for d in r.deflections if d.kind == "meaning"])
    control = np.array([d.final_angle for d in r.deflections if d.kind == "control"])
    if not len(meaning) or not len(control):
        return float("nan")
    diff = meaning[:, None] - control[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


CLAIMS = (
    Claim(CURVATURE, "excess sharp turns",
          f"raw-stream fraction of turns >= 120 deg above the random-walk null (Holm p < 0.05), by >= {SHARP_FLOOR:.0%} "
          "of turns", _beats_walk("sharp_fraction"), p_value=_walk_p("sharp_fraction"), effect=_sharp_excess,
          floor=SHARP_FLOOR, effect_units="share of turns above the walk's", units="share of turns (0-1)"),
    Claim(CURVATURE, "longer length-to-chord than chance",
          f"raw-stream length-to-chord above the random-walk null (Holm p < 0.05), by >= {CHORD_FLOOR:.0%}",
          _beats_walk("length_to_chord"), p_value=_walk_p("length_to_chord"), effect=_chord_excess, floor=CHORD_FLOOR,
          effect_units="relative excess over the walk", units="path length / chord (dimensionless, >= 1)"),
    Claim(CURVATURE, "meaning edits deflect more than control edits",
          "final angle between clean and edited target: Mann-Whitney meaning > control (Holm p < 0.05), "
          f"Vargha-Delaney A >= {DEFLECTION_FLOOR}", _deflects, p_value=lambda r: (r.final_angle_p, None),
          effect=_vargha_delaney, floor=DEFLECTION_FLOOR, effect_units="P(meaning > control)"),
)
CurvatureResult.claims = CLAIMS


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    pairs: tuple[EditPair, ...] = EDIT_PAIRS,
    patch_streams: tuple[str, ...] = ("resid",),
    n_draws: int = 20,
    seed: int = 0,
    **capture_kwargs,
) -> CurvatureResult:
    """Curvature of every included token's trajectory against its nulls, and deflection under ``pairs``.

    A ``Capture`` needs ``model=`` (the edit pairs and patched runs are run here). ``patch_streams``
    chooses from ``"resid"``, ``"attn_out"``, ``"mlp_out"`` (one batched forward pass per pair and
    stream); the untrained control measures deflection but patches nothing.
    """
    unknown = set(patch_streams) - set(PATCH_HOOKS)
    if unknown:
        raise ArgumentError(f"unknown patch stream(s) {sorted(unknown)}: choose from {sorted(PATCH_HOOKS)}")
    options = dict(pairs=pairs, n_draws=n_draws, seed=seed)

    def measure_one(cap: Capture, model) -> CurvatureResult:
        return _measure(cap, model, patch_streams=tuple(patch_streams), **options)

    def measure_control(cap: Capture, model) -> CurvatureResult:  # deflection only: no patching
        return _measure(cap, model, patch_streams=(), **options)

    return measure_with_control("curvature", capture_or_model, prompts, STREAMS, measure_one, model=model,
                                control=control, needs_model="edited prompts and patched runs are run on it",
                                measure_control=measure_control, **capture_kwargs)


def _measure(cap: Capture, model, pairs, patch_streams, n_draws, seed) -> CurvatureResult:
    cap.require_streams(STREAMS)
    states = cap.tokens_of("resid")  # [state, token, d_model]
    if states.shape[1] == 0:
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    spherical = torch.nn.functional.normalize(states, dim=-1)
    raw_steps = step_coordinates(torch.diff(states.to(torch.float64), dim=0))
    longest = int(torch.argmax(cap.mask.sum(1)))
    deflections = _deflections(model, pairs, patch_streams)
    meaning = [d for d in deflections if d.kind == "meaning"]
    controls = [d for d in deflections if d.kind == "control"]
    angle_stats = _one_sided([d.final_angle for d in meaning], [d.final_angle for d in controls])
    kl_stats = _one_sided([d.output_kl for d in meaning], [d.output_kl for d in controls])
    return CurvatureResult(
        conventions=Conventions(
            aggregation="angles and length-to-chord over every included token's trajectory pooled; nulls with the same "
            f"step lengths, {n_draws} draws; deflection at the last token of each edit pair",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        raw=compare_steps_with_nulls(raw_steps, states.shape[-1], n_draws, seed),
        raw_token_statistics={name: to_numpy(values) for name, values in token_statistics(raw_steps).items()},
        token_prompt=to_numpy(prompt_index(cap.mask)),
        sphere=compare_with_nulls(spherical, n_draws, seed),
        landscapes=tuple(_landscape(cap, i) for i in [longest, *(i for i in range(len(cap.mask)) if i != longest)]),
        deflections=deflections,
        final_angle_meaning=float(np.mean([d.final_angle for d in meaning])) if meaning else float("nan"),
        final_angle_control=float(np.mean([d.final_angle for d in controls])) if controls else float("nan"),
        final_angle_p=angle_stats,
        output_kl_meaning=float(np.mean([d.output_kl for d in meaning])) if meaning else float("nan"),
        output_kl_control=float(np.mean([d.output_kl for d in controls])) if controls else float("nan"),
        output_kl_p=kl_stats,
    )


def _landscape(cap: Capture, prompt: int) -> Landscape:
    keep = cap.mask[prompt].tolist()
    return Landscape(cap.prompts.labels[prompt], tuple(t for t, k in zip(cap.str_tokens[prompt], keep) if k),
                     to_numpy(turning_angles(cap.tokens_of("resid", prompt=prompt))))


def _one_sided(a: list[float], b: list[float]) -> float:
    if len(a) < 2 or len(b) < 2 or not np.isfinite(a + b).all():
        return float("nan")
    return float(stats.mannwhitneyu(a, b, alternative="greater").pvalue)


def _deflections(model, pairs: tuple[EditPair, ...], patch_streams: tuple[str, ...]) -> tuple[Deflection, ...]:
    """Every pair's deflection from one capture of all their prompts, and every patch sweep of one stream in one batch."""
    if not pairs:
        return ()
    texts = list(dict.fromkeys(t for pair in pairs for t in (pair.clean, pair.edited)))  # shared clean prompts run once
    row = {t: i for i, t in enumerate(texts)}
    cap = capture(model, texts, streams=("resid", *(s for s in patch_streams if s != "resid")), exclude=())
    lengths = cap.token_mask.sum(1).tolist()
    ids = [cap.tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    special = set(getattr(model.tokenizer, "all_special_ids", ()))
    rows = [(row[pair.clean], row[pair.edited]) for pair in pairs]
    # The target is the last token that is not special (an encoder ends on [SEP]).
    targets = []
    for pair, (c, e) in zip(pairs, rows):
        ordinary = [i for i, t in enumerate(ids[c]) if t not in special]
        if not ordinary:  # a tokenizer that knows none of the pair's words (each an unknown token, which is special)
            raise PromptError(f"edit pair {pair.label!r} is only special tokens under this model's tokenizer "
                              f"({len(ids[c])} of them): it has no target token to follow; give pairs in its vocabulary")
        target = max(ordinary)
        targets.append((target, align(ids[c], ids[e]).edited_position(target)))
    profiles = [deflection_profile(cap.prompt_of("resid", c)[:, tc], cap.prompt_of("resid", e)[:, te])
                for (c, e), (tc, te) in zip(rows, targets)]
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        # Next-token logits belong to causal language models; an encoder gets the geometry only.
        nan = float("nan")
        return tuple(
            Deflection(label=pair.label, kind=pair.kind, distance=distance, angle=angle, step_angle=step_angle,
                       part_layer=part, final_angle=float(angle[-1]), output_kl=nan, ld_clean=nan, ld_edited=nan, recovery={})
            for pair, (distance, angle, step_angle, part) in zip(pairs, profiles)
        )
    # The capture already holds the last block's output: the logits need no second forward pass.
    last_states = torch.stack([cap.prompt_of("resid", r)[-1, t] for (c, e), (tc, te) in zip(rows, targets)
                               for r, t in ((c, tc), (e, te))])
    logits = final_logits(model, last_states).reshape(len(pairs), 2, -1)
    # An answer's first token stands for it (" sunglasses" is several tokens).
    answers = [tuple(text_token_ids(model, (pair.clean_answer, pair.edited_answer), "edit-pair answers", single=False))
               for pair in pairs]
    ld = [[float(l[a] - l[b]) for l in pair_logits] for pair_logits, (a, b) in zip(logits, answers)]
    logp = torch.log_softmax(logits.double(), dim=-1)
    kl = (logp[:, 0].exp() * (logp[:, 0] - logp[:, 1])).sum(-1).tolist()
    patched = [i for i, pair in enumerate(pairs) if pair.kind == "meaning" and abs(ld[i][1] - ld[i][0]) > 1e-6]
    recovery: list[dict[str, np.ndarray]] = [{} for _ in pairs]
    for stream in patch_streams if patched else ():
        blocks = slice(0, cap.n_layers)  # resid holds one more state (the last block's output) than there are blocks
        sweeps = patch_sweeps(model, [torch.tensor(ids[rows[i][0]]) for i in patched],
                              [cap.prompt_of(stream, rows[i][1])[blocks] for i in patched],
                              [[targets[i][0]] for i in patched], [[targets[i][1]] for i in patched], stream)
        for i, sweep in zip(patched, sweeps):
            (a, b), (ld_clean, ld_edited) = answers[i], ld[i]
            ld_patched = to_numpy((sweep[:, a] - sweep[:, b]).double())
            recovery[i][stream] = (ld_patched - ld_clean) / (ld_edited - ld_clean)
    return tuple(
        Deflection(label=pair.label, kind=pair.kind, distance=distance, angle=angle, step_angle=step_angle, part_layer=part,
                   final_angle=float(angle[-1]), output_kl=kl[i], ld_clean=ld[i][0], ld_edited=ld[i][1], recovery=recovery[i])
        for i, (pair, (distance, angle, step_angle, part)) in enumerate(zip(pairs, profiles))
    )


@dataclass(frozen=True)
class CurvatureParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    patch_streams: tuple[str, ...] = option(("resid",), "what to patch from the edited run into the clean one "
                                            "(none: no patching)", choices=tuple(PATCH_HOOKS), empty=True)
    n_draws: int = option(20, "draws of each curvature null", flag="--null-draws", at_least=1)


ANALYSIS = Analysis(
    name="curvature",
    help="turning angles and length-to-chord against null walks; deflection and patching under context edits",
    heading="Curvature and deflection",
    order=50,
    streams=STREAMS,
    result=CurvatureResult,
    measure=measure,
    parameters=CurvatureParameters,
    # A reference measures deflection but patches nothing, as measure()'s own control does: the patch
    # sweeps are most of a run's cost here, and recovery reads the trained model's circuits.
    reference_keywords={"patch_streams": ()},
)
