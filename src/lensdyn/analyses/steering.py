"""Steering vectors across blocks: the expansion write-up's predictions 5 and 6, measured.

The write-up predicts that (5) steering works best at low-H blocks and (6) a vector extracted at
state ``s`` and applied at block ``t`` has its effective magnitude scaled by
``1 + z = a(t) / a(s)``. It tested neither. Definitions (``h_lpt``: residual at state ``l``,
prompt ``p``, position ``t``; tokens are each capture's mask):

- vector: ``v_l = mean_{p in positive} mean_t h_lpt - mean_{p in negative} mean_t h_lpt``, the
  difference of means of a ``ContrastSet`` (float64); ``u_l = v_l / ||v_l||``.
- applying: the vector is added at ``blocks.t.hook_resid_pre`` at every position
  (``lensdyn.hooks.steering``). Its size is a relative norm ``r = ||added|| / N(t)``, where
  ``N(t)`` is the mean residual norm at state ``t`` over the evaluation prompts' included tokens.
- effect: ``E = LD(steered) - LD(unsteered)`` at the evaluation prompt's last token, with
  ``LD = mean logit(positive targets) - mean logit(negative targets)``, averaged over the
  evaluation prompts. ``KL(unsteered || steered)`` there says how much else the vector changed.
- efficacy (prediction 5, block selection): the slope through the origin of ``E`` against ``r``
  over ``r <= LINEAR_MAX``: ``sum r E / sum r^2``, per block, compared with ``H(l)`` (from the
  capture's ``a(l)``, ``analyses.expansion``) by a Spearman correlation over blocks.
- transfer (prediction 6): ``v_s`` applied at block ``t``. ``m*(s, t)`` is the norm of the added
  vector that reaches the effect ``E*`` (first crossing along the ``r`` grid, linear
  interpolation; NaN when never reached). ``E* = TARGET_FRACTION * median_l max_r E_native(l, r)``.
  What a user would have to set as the multiplier ``alpha`` under each correction:

  ==================  =============================  =================================
  correction          vector added at ``t``          ``alpha*``
  ==================  =============================  =================================
  ``none``            ``alpha v_s``                  ``m* / ||v_s||``
  ``redshift``        ``alpha (a(t) / a(s)) v_s``    ``m* a(s) / (||v_s|| a(t))``
  ``redshift_causal`` the same with causal ``a``     (``causal_inverse``, ``lensdyn.metric``)
  ``norm_match``      ``alpha N(t) u_s``             ``m* / N(t)``
  ==================  =============================  =================================

  A correction makes transfer block-independent when ``alpha*`` is the same for every pair:
  its ``spread`` is the standard deviation of ``log10 alpha*`` over the pairs that reach ``E*``
  (the same pairs for every correction: a correction only rescales). A bootstrap over the
  evaluation prompts gives each spread's 95% interval and how often redshift beats the others.

``a(l)`` comes from the capture (by default the diverse set), ``N(t)`` from the evaluation
prompts: ``redshift`` carries the vector's own size at its source, ``norm_match`` discards it.

Layer choice and extraction conventions (beside the write-up's predictions):

- lens accessibility of the targets at state ``l``: ``A(l) = LD(lens(m^+_l)) - LD(lens(m^-_l))``,
  where ``m^+_l`` and ``m^-_l`` are the mean states of the positive and negative texts (the two
  terms of ``v_l``) and ``lens`` is the final norm and unembedding (the logit lens,
  ``hooks.patching.final_logits``). Large where the contrast already reads out as the targets.
  Does ``A`` predict efficacy across blocks better than ``H``? ``|Spearman(efficacy, A)|`` against
  ``|Spearman(efficacy, H)|``, with a bootstrap over the steered blocks (both correlations on the
  same resampled blocks).
- extractions (``EXTRACTIONS``), all at the input of block ``l``: ``mean`` is ``v_l`` above
  (lensdyn's); ``last`` the difference of means at each text's last included token (CAA; the
  steering-vectors library's default); ``pca`` the first principal component of the paired
  last-token differences (repeng), sign and size from the mean difference
  (``paired_principal_vector``). Each is steered at the same relative norms (only its direction
  matters there) and run through the transfer test (its own ``||v_s||``), so prediction 6 is
  judged per extraction.

>>> result = steering.measure(ld.load_model("smollm2-135m"))      # doctest: +SKIP
>>> print(result.summary())                                       # doctest: +SKIP
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from lensdyn import citations
from lensdyn.analyses.expansion import scale_factor
from lensdyn.errors import ArgumentError, PromptError, UnsupportedArchitectureError
from lensdyn.fits import hubble
from lensdyn.hooks.capture import Capture, capture
from lensdyn.hooks.circuits import model_causal_metric
from lensdyn.hooks.patching import final_logits, last_logits
from lensdyn.hooks.steering import steered_last_logits
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.metric import metric_norms
from lensdyn.models import text_token_ids
from lensdyn.ops import masked_mean, masked_tokens, to_numpy, token_norms
from lensdyn.progress import track
from lensdyn.prompts import PromptSet
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.verdicts import Claim

STREAMS = ("resid",)
CORRECTIONS = ("none", "redshift", "redshift_causal", "norm_match")
CAUSAL_METRIC = "causal_inverse"  # the metric of a_causal and redshift_causal (lensdyn.metric.METRICS)
RELATIVE = (0.125, 0.25, 0.5, 1.0, 2.0)
LINEAR_MAX = 0.5
TARGET_FRACTION = 0.5
EXTRACTIONS = ("mean", "last", "pca")  # lensdyn's, CAA's (steering-vectors), repeng's


# --- contrast sets (the built-in steering texts; a user's own from JSON) --------------------


@dataclass(frozen=True)
class ContrastSet:
    """Two sets of texts that differ in one concept, for difference-of-means steering vectors.

    ``positive`` and ``negative`` are the contrastive texts (the vector points from negative to
    positive). ``evaluation`` are neutral prompts the vector is added to; its effect is read at
    their last token as the mean logit of ``positive_targets`` minus that of ``negative_targets``
    (each target one token). A JSON file with these five keys is a user's own set (``load_contrast``).
    The ``pca`` extraction pairs ``positive[i]`` with ``negative[i]``: it needs as many of each.
    """

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    evaluation: tuple[str, ...]
    positive_targets: tuple[str, ...]
    negative_targets: tuple[str, ...]

    def __post_init__(self):
        for field_name in ("positive", "negative", "evaluation", "positive_targets", "negative_targets"):
            values = getattr(self, field_name)
            if isinstance(values, str) or not values or not all(isinstance(v, str) and v.strip() for v in values):
                raise PromptError(f"contrast set {self.name!r}: {field_name} must be a non-empty list of non-empty texts")
        if set(self.positive_targets) & set(self.negative_targets):
            raise PromptError(f"contrast set {self.name!r}: a target is both positive and negative")


# Written for lensdyn. Pairs of sentences share their frame, so the difference of means is the concept.
CONTRAST_SETS: dict[str, ContrastSet] = {
    "sentiment": ContrastSet(
        name="sentiment",
        positive=(
            "I loved every minute of the film; it was a joy.",
            "The soup was delicious and the staff were so kind.",
            "What a wonderful day at the beach with my friends.",
            "She was thrilled with the gift and hugged everyone.",
            "The new park is beautiful, clean and full of flowers.",
            "His speech was brilliant and the crowd cheered.",
            "We had a fantastic holiday and can't wait to go back.",
            "The puppy is adorable and makes us so happy.",
            "This book is a delight from the first page to the last.",
            "The team played superbly and won the final.",
            "Our neighbours are lovely and always help out.",
            "The concert was amazing, the best night of the year.",
        ),
        negative=(
            "I hated every minute of the film; it was a chore.",
            "The soup was disgusting and the staff were so rude.",
            "What a miserable day at the beach with my friends.",
            "She was upset with the gift and ignored everyone.",
            "The new park is ugly, dirty and full of litter.",
            "His speech was dreadful and the crowd booed.",
            "We had an awful holiday and never want to go back.",
            "The puppy is aggressive and makes us so anxious.",
            "This book is a slog from the first page to the last.",
            "The team played terribly and lost the final.",
            "Our neighbours are unpleasant and never help out.",
            "The concert was boring, the worst night of the year.",
        ),
        evaluation=(
            "I watched the movie last night and it was",
            "The food at the new restaurant was",
            "My week at work has been",
            "The weather on our trip was",
            "Honestly, the service at the hotel was",
            "Overall, I think the book is",
        ),
        positive_targets=(" good", " great", " wonderful", " excellent", " happy"),
        negative_targets=(" bad", " terrible", " awful", " horrible", " sad"),
    ),
    "formality": ContrastSet(
        name="formality",
        positive=(
            "I would be grateful if you could send the report at your earliest convenience.",
            "Please accept my sincere apologies for the delay in responding.",
            "We regret to inform you that the meeting has been postponed.",
            "Kindly find attached the documents you requested.",
            "I am writing to enquire about the position advertised.",
            "It is my pleasure to welcome you to the conference.",
            "Should you require further information, do not hesitate to contact us.",
            "The committee has reviewed your proposal with great interest.",
        ),
        negative=(
            "hey can u send me the report whenever, thx",
            "sorry for the late reply lol, been super busy",
            "so yeah the meeting's off, we'll do it some other time",
            "here's the stuff you wanted, cheers",
            "yo is that job still going? kinda keen",
            "welcome to the thing, glad you made it!",
            "if you need anything just ping me ok",
            "we checked out your idea and it's pretty cool tbh",
        ),
        evaluation=(
            "Regarding the schedule for next week,",
            "About the party on Saturday,",
            "Thanks for your message. I",
            "Quick update on the project:",
            "As discussed in our call,",
            "Just wanted to say that",
        ),
        positive_targets=(" therefore", " however", " regarding", " pleased", " furthermore"),
        negative_targets=(" gonna", " yeah", " hey", " cool", " awesome"),
    ),
}


def load_contrast(path: str | Path) -> ContrastSet:
    """A contrast set from a JSON file with keys positive, negative, evaluation, positive_targets, negative_targets."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PromptError(f"cannot read contrast set {path}: {err}") from err
    keys = ("positive", "negative", "evaluation", "positive_targets", "negative_targets")
    missing = [k for k in keys if k not in data]
    if missing:
        raise PromptError(f"contrast set {path} lacks {', '.join(missing)}: it needs {', '.join(keys)}")
    return ContrastSet(name=data.get("name", path.stem), **{k: tuple(data[k]) for k in keys})


def resolve_contrast(contrast) -> ContrastSet:
    """A ``ContrastSet``, a built-in name (``CONTRAST_SETS``), or a path to a JSON file."""
    if isinstance(contrast, ContrastSet):
        return contrast
    if isinstance(contrast, str) and contrast in CONTRAST_SETS:
        return CONTRAST_SETS[contrast]
    if isinstance(contrast, (str, Path)) and Path(contrast).is_file():
        return load_contrast(contrast)
    raise PromptError(f"unknown contrast set {contrast!r}: choose from {', '.join(CONTRAST_SETS)} or give a JSON file")


# --- pure functions of tensors -------------------------------------------------------------


def prompt_means(states: Float[Tensor, "state prompt pos d_model"], mask: Bool[Tensor, "prompt pos"]
                 ) -> Float[Tensor, "state prompt d_model"]:
    """Each prompt's mean state over its masked tokens, ``mean_t h_lpt``, float64.

    >>> prompt_means(torch.tensor([[[[1., 0.], [3., 4.]]]]), torch.tensor([[True, True]]))
    tensor([[[2., 2.]]], dtype=torch.float64)
    """
    if not bool(mask.any(1).all()):
        raise ArgumentError("a contrast prompt has no included token: its mean state is undefined")
    weights = mask.to(states.device, torch.float64)
    weights = weights / weights.sum(1, keepdim=True)
    return torch.einsum("lptd,pt->lpd", states.to(torch.float64), weights)


def class_means(means: Float[Tensor, "state prompt d_model"], positive: Bool[Tensor, " prompt"]
                ) -> tuple[Float[Tensor, "state d_model"], Float[Tensor, "state d_model"]]:
    """``(mean_{p in pos} m_lp, mean_{p in neg} m_lp)`` of per-prompt states ``m`` (each prompt weighs the same).

    >>> pos, neg = class_means(torch.tensor([[[1.], [3.], [10.]]]), torch.tensor([True, True, False]))
    >>> pos.item(), neg.item()
    (2.0, 10.0)
    """
    if not bool(positive.any()) or bool(positive.all()):
        raise ArgumentError("difference of means needs at least one positive and one negative prompt")
    return means[:, positive].mean(1), means[:, ~positive].mean(1)


def difference_of_means(
    states: Float[Tensor, "state prompt pos d_model"], mask: Bool[Tensor, "prompt pos"], positive: Bool[Tensor, " prompt"]
) -> Float[Tensor, "state d_model"]:
    """``v_l = mean_{p in pos} mean_t h_lpt - mean_{p in neg} mean_t h_lpt`` (each prompt weighs the same), float64.

    With ``last_token_mask(mask)`` it is the last-token difference of means (CAA).

    >>> h = torch.tensor([[[[1., 0.], [3., 0.]], [[0., 1.], [0., 5.]]]])       # 1 state, 2 prompts, 2 positions
    >>> difference_of_means(h, torch.ones(2, 2, dtype=torch.bool), torch.tensor([True, False]))
    tensor([[ 2., -3.]], dtype=torch.float64)
    """
    pos, neg = class_means(prompt_means(states, mask), positive)
    return pos - neg


def last_token_mask(mask: Bool[Tensor, "prompt pos"]) -> Bool[Tensor, "prompt pos"]:
    """Only each prompt's last masked position (right padding: padding and exclusions are False).

    >>> last_token_mask(torch.tensor([[False, True, True, False], [False, True, False, False]]))
    tensor([[False, False,  True, False],
            [False,  True, False, False]])
    """
    if not bool(mask.any(1).all()):
        raise ArgumentError("a contrast prompt has no included token: it has no last token")
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask, positions, -1).max(1).values
    return positions == last[:, None]


def paired_principal_vector(differences: Float[Tensor, "state pair d_model"]) -> Float[Tensor, "state d_model"]:
    """The mean paired difference projected on the first principal axis of the paired differences (repeng).

    ``d_lp = h^+_lp - h^-_lp`` (pair ``p``); ``u_l`` is the top right singular vector of the
    differences centred over pairs (what repeng's ``PCA(n_components=1).fit`` finds); the vector is
    ``(u_l . dbar_l) u_l``, ``dbar_l = mean_p d_lp``. Its sign therefore agrees with the mean
    difference (repeng instead votes over pairs), and its size is the mean difference's along
    ``u_l``: it carries a size at its source, as the transfer test's uncorrected and redshift
    alphas need. float64.

    >>> d = torch.tensor([[[3., 1.], [-1., 1.], [1., 1.]]])            # spread along x, mean (1, 1)
    >>> paired_principal_vector(d)
    tensor([[1., 0.]], dtype=torch.float64)
    """
    if differences.shape[1] < 2:
        raise ArgumentError("the principal component of paired differences needs at least 2 pairs")
    d = differences.to(torch.float64)
    mean = d.mean(1)
    axis = torch.linalg.svd(d - mean[:, None], full_matrices=False).Vh[:, 0]
    return (axis * mean).sum(-1, keepdim=True) * axis


def check_extractions(extractions) -> None:
    """An ``ArgumentError`` for a name outside ``EXTRACTIONS`` (before any forward pass)."""
    unknown = sorted(set(extractions) - set(EXTRACTIONS))
    if unknown:
        raise ArgumentError(f"unknown extraction {', '.join(unknown)}: choose from {', '.join(EXTRACTIONS)}")


def extraction_vectors(
    states: Float[Tensor, "state prompt pos d_model"], mask: Bool[Tensor, "prompt pos"], positive: Bool[Tensor, " prompt"],
    extractions: tuple[str, ...] = EXTRACTIONS,
) -> dict[str, Float[Tensor, "state d_model"]]:
    """Each extraction's steering vector per state (module docstring: ``mean``, ``last``, ``pca``).

    ``pca`` pairs the ``i``-th positive prompt with the ``i``-th negative one (in the order given).

    >>> h = torch.tensor([[[[0., 0.], [2., 0.]], [[0., 0.], [0., 2.]]]])  # the concept sits at the last token
    >>> out = extraction_vectors(h, torch.ones(2, 2, dtype=torch.bool), torch.tensor([True, False]), ("mean", "last"))
    >>> out["mean"], out["last"]
    (tensor([[ 1., -1.]], dtype=torch.float64), tensor([[ 2., -2.]], dtype=torch.float64))
    """
    check_extractions(extractions)
    out = {}
    if "mean" in extractions:
        out["mean"] = difference_of_means(states, mask, positive)
    last = prompt_means(states, last_token_mask(mask)) if {"last", "pca"} & set(extractions) else None
    if "last" in extractions:
        pos, neg = class_means(last, positive)
        out["last"] = pos - neg
    if "pca" in extractions:
        if int(positive.sum()) != int((~positive).sum()):
            raise ArgumentError(f"the pca extraction pairs positive and negative texts: {int(positive.sum())} positive "
                                f"and {int((~positive).sum())} negative cannot pair")
        out["pca"] = paired_principal_vector(last[:, positive] - last[:, ~positive])
    return {name: out[name] for name in extractions}


def logit_difference(
    logits: Float[Tensor, "batch vocab"], positive_ids: Int[Tensor, " k"], negative_ids: Int[Tensor, " j"]
) -> Float[Tensor, " batch"]:
    """``LD = mean_k logit[positive_k] - mean_j logit[negative_j]``, float64.

    >>> logit_difference(torch.tensor([[1., 5., 2.]]), torch.tensor([1]), torch.tensor([0, 2]))
    tensor([3.5000], dtype=torch.float64)
    """
    x = logits.to(torch.float64)
    return x[:, positive_ids].mean(1) - x[:, negative_ids].mean(1)


def kl_divergence(reference: Float[Tensor, "batch vocab"], logits: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
    """``KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v))`` from logits, float64.

    >>> kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3))
    tensor([0.], dtype=torch.float64)
    """
    ref = torch.log_softmax(reference.to(torch.float64), -1)
    new = torch.log_softmax(logits.to(torch.float64), -1)
    return (ref.exp() * (ref - new)).sum(-1)


def lens_accessibility(
    model, positive: Float[Tensor, "state d_model"], negative: Float[Tensor, "state d_model"],
    positive_ids: Int[Tensor, " k"], negative_ids: Int[Tensor, " j"],
) -> Float[np.ndarray, " state"]:
    """``A(l) = LD(lens(m^+_l)) - LD(lens(m^-_l))``, ``lens`` the final norm and unembedding (``final_logits``).

    >>> m = torch.nn.Module(); m.ln_final = torch.nn.Identity(); m.unembed = torch.nn.Linear(2, 2, bias=False)
    >>> _ = m.unembed.weight.data.copy_(torch.tensor([[1., 0.], [0., 1.]]))       # token 0 reads x, token 1 reads y
    >>> lens_accessibility(m, torch.tensor([[3., 0.]]), torch.tensor([[0., 1.]]), torch.tensor([0]), torch.tensor([1]))
    array([4.])
    """
    logits = final_logits(model, torch.cat([positive, negative]))
    ld = logit_difference(logits, positive_ids, negative_ids)
    return to_numpy(ld[: len(positive)] - ld[len(positive):])


def share_more_predictive(
    target: Float[np.ndarray, " n"], predictor: Float[np.ndarray, " n"], rival: Float[np.ndarray, " n"],
    n_draws: int, seed: int = 0,
) -> float:
    """Share of resamples of the ``n`` items (with replacement) in which ``|rho(target, predictor)| > |rho(target, rival)|``.

    ``rho`` is Spearman's; a draw where either is undefined (a constant resample) is left out.

    >>> x = np.arange(8.)
    >>> share_more_predictive(x, x ** 3, np.array([0., 1, 0, 1, 0, 1, 0, 1]), 50)
    1.0
    """
    rng = np.random.default_rng(seed)
    wins = []
    for _ in range(n_draws):
        drawn = rng.integers(0, len(target), len(target))
        with np.errstate(invalid="ignore", divide="ignore"):
            rho_p = _spearman(target[drawn], predictor[drawn])
            rho_r = _spearman(target[drawn], rival[drawn])
        if np.isfinite(rho_p) and np.isfinite(rho_r):
            wins.append(abs(rho_p) > abs(rho_r))
    return float(np.mean(wins)) if wins else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho, NaN (not a warning) where either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y)[0])


def efficacy(relative: Float[np.ndarray, " r"], effect: Float[np.ndarray, "steered r"], linear_max: float = LINEAR_MAX
             ) -> Float[np.ndarray, " steered"]:
    """Effect per unit relative norm: the slope through the origin over ``r <= linear_max``, ``sum r E / sum r^2``.

    >>> efficacy(np.array([0.25, 0.5, 1.0]), np.array([[0.5, 1.0, 9.0]]))
    array([2.])
    """
    keep = relative <= linear_max
    if not keep.any():
        raise ArgumentError(f"no relative norm <= {linear_max} in the grid {relative.tolist()}: efficacy needs the linear regime")
    r = relative[keep]
    return (effect[..., keep] * r).sum(-1) / (r * r).sum()


def magnitude_for_effect(
    magnitudes: Float[np.ndarray, "*#pair r"], effect: Float[np.ndarray, "*pair r"], target: float
) -> Float[np.ndarray, " *pair"]:
    """The magnitude where ``effect`` first reaches ``target`` along the grid (effect 0 at magnitude 0),
    by linear interpolation between the bracketing points; NaN where it never does.

    >>> magnitude_for_effect(np.array([1., 2., 4.]), np.array([0.5, 1.5, 3.0]), 1.0)
    array(1.5)
    >>> magnitude_for_effect(np.array([1., 2.]), np.array([0.1, 0.2]), 1.0)
    array(nan)
    """
    magnitudes = np.broadcast_to(magnitudes, effect.shape)
    m = np.concatenate([np.zeros_like(magnitudes[..., :1]), magnitudes], -1)
    e = np.concatenate([np.zeros_like(effect[..., :1]), effect], -1)
    reached = e >= target
    first = np.argmax(reached, axis=-1)  # the first grid index at or above target
    hit = reached.any(-1) & (first > 0) if np.isfinite(target) and target > 0 else np.zeros(first.shape, bool)
    below = np.maximum(first - 1, 0)
    m0, m1 = np.take_along_axis(m, below[..., None], -1)[..., 0], np.take_along_axis(m, first[..., None], -1)[..., 0]
    e0, e1 = np.take_along_axis(e, below[..., None], -1)[..., 0], np.take_along_axis(e, first[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = m0 + (target - e0) * (m1 - m0) / (e1 - e0)
    return np.where(hit, out, np.nan)


def transfer_alphas(
    magnitude: Float[np.ndarray, "source target"],
    vector_norms: Float[np.ndarray, " source"],
    scale: dict[str, Float[np.ndarray, "source target"]],
    eval_norms: Float[np.ndarray, " target"],
) -> dict[str, Float[np.ndarray, "source target"]]:
    """``alpha*`` under each correction (module docstring) from the needed magnitudes ``m*(s, t)``.

    ``scale[name][s, t]`` is the redshift factor ``a(t) / a(s)`` under metric ``name``.

    >>> out = transfer_alphas(np.array([[2., 8.]]), np.array([1.]), {"redshift": np.array([[1., 4.]])}, np.array([1., 2.]))
    >>> out["none"], out["redshift"], out["norm_match"]
    (array([[2., 8.]]), array([[2., 2.]]), array([[2., 4.]]))
    """
    out = {"none": magnitude / vector_norms[:, None]}
    for name, factor in scale.items():
        out[name] = magnitude / (vector_norms[:, None] * factor)
    out["norm_match"] = magnitude / eval_norms[None, :]
    return out


def log_spread(alpha: Float[np.ndarray, "*pair"]) -> float:
    """Standard deviation of ``log10 alpha`` over the finite entries (0: one alpha fits every pair).

    >>> log_spread(np.array([[1., 10.], [np.nan, 100.]]))
    0.816496580927726
    """
    finite = np.log10(alpha[np.isfinite(alpha)])
    return float(finite.std()) if finite.size >= 2 else float("nan")


def redshift_factors(a: Float[np.ndarray, " state"], sources: Int[np.ndarray, " s"], targets: Int[np.ndarray, " t"]
                     ) -> Float[np.ndarray, "s t"]:
    """``1 + z(s -> t) = a(t) / a(s)`` for every source and target state.

    >>> redshift_factors(np.array([1., 2., 8.]), np.array([0, 1]), np.array([2]))
    array([[8.],
           [4.]])
    """
    return a[None, targets] / a[sources, None]


# --- the result ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """Prediction 6 on one grid of source and target blocks."""

    layers: Int[np.ndarray, " steered"]  # sources = targets
    magnitude: Float[np.ndarray, "source target"]  # m*(s, t), NaN where E* is never reached
    alpha: dict[str, Float[np.ndarray, "source target"]]  # per correction
    spread: dict[str, float]  # std of log10 alpha* over reached pairs
    spread_low: dict[str, float]  # bootstrap 2.5th percentile
    spread_high: dict[str, float]  # bootstrap 97.5th percentile
    redshift_beats: dict[str, float]  # share of bootstrap draws where redshift's spread is below the other's
    n_reached: int
    n_pairs: int


@dataclass(frozen=True, eq=False)
class SteeringResult(Result):
    """Steering effects per block, against ``H(l)``, and transfer between blocks under each correction.

    Shapes: ``block = n_layers``; ``steered`` the steered blocks (``layers``); ``r`` the relative-norm grid.
    """

    contrast: str
    positive_targets: tuple[str, ...]
    negative_targets: tuple[str, ...]
    n_evaluation: int
    a: Float[np.ndarray, " state"]  # Euclidean scale factor of the capture
    a_causal: Float[np.ndarray, " state"]  # scale factor under the causal_inverse metric (Conventions.causal_metrics)
    hubble: Float[np.ndarray, " block"]
    eval_norms: Float[np.ndarray, " block"]  # N(t), mean residual norm of the evaluation prompts
    vector_norms: Float[np.ndarray, " block"]  # ||v_l||
    layers: Int[np.ndarray, " steered"]
    relative: Float[np.ndarray, " r"]
    effect: Float[np.ndarray, "steered r"]  # native: v_l at block l, mean over evaluation prompts
    kl: Float[np.ndarray, "steered r"]
    efficacy: Float[np.ndarray, " steered"]
    efficacy_h_spearman: float
    efficacy_h_p: float
    target_effect: float  # E*
    transfer: Transfer
    # Layer choice and extraction conventions (module docstring); defaults: a file written before them.
    accessibility: Float[np.ndarray, " block"] = field(default_factory=lambda: np.zeros(0))  # A(l)
    efficacy_access_spearman: float = float("nan")
    efficacy_access_p: float = float("nan")
    access_beats_h: float = float("nan")  # share of block resamples with |rho(eff, A)| > |rho(eff, H)|
    # The extractions beside lensdyn's mean (which is efficacy, transfer, vector_norms above).
    extraction_efficacy: dict[str, Float[np.ndarray, " steered"]] = field(default_factory=dict)
    extraction_cosine: dict[str, Float[np.ndarray, " block"]] = field(default_factory=dict)  # with mean's
    extraction_transfer: dict[str, Transfer] = field(default_factory=dict)
    control: SteeringResult | None = None

    @property
    def best_layer(self) -> int:
        return int(self.layers[int(np.nanargmax(self.efficacy))])

    @property
    def efficacies(self) -> dict[str, np.ndarray]:
        """Efficacy per steered block of every extraction measured, lensdyn's ``mean`` first."""
        return {"mean": self.efficacy, **self.extraction_efficacy}

    @property
    def transfers(self) -> dict[str, Transfer]:
        return {"mean": self.transfer, **self.extraction_transfer}

    @property
    def best_extraction(self) -> tuple[str, ...]:
        """The extraction that steers best (highest efficacy) at each steered block."""
        names = list(self.efficacies)
        stacked = np.stack(list(self.efficacies.values()))
        return tuple(names[i] for i in np.argmax(np.where(np.isnan(stacked), -np.inf, stacked), 0))

    def summary(self) -> str:
        t = self.transfer
        lines = [
            f"steering {self.provenance.model} ({self.provenance.weights}), contrast {self.contrast!r}: "
            f"{len(self.layers)} blocks x {len(self.relative)} relative norms x {self.n_evaluation} evaluation prompts",
            f"  efficacy (logit-difference shift per unit relative norm, r <= {LINEAR_MAX}): best block {self.best_layer} "
            f"({np.nanmax(self.efficacy):.2f}); median {np.nanmedian(self.efficacy):.2f}",
            f"  Spearman(efficacy, H) over blocks = {self.efficacy_h_spearman:+.3f} (p = {self.efficacy_h_p:.3g})",
            f"  target effect E* = {self.target_effect:.3f}; {t.n_reached}/{t.n_pairs} transfer pairs reach it",
            "  correction       spread of log10 alpha*   95% bootstrap",
        ]
        for name in CORRECTIONS:
            interval = f"[{t.spread_low[name]:.3f}, {t.spread_high[name]:.3f}]"
            lines.append(f"  {name:<16} {t.spread[name]:>8.3f}               {interval}")
        if self.accessibility.size:
            lines.append(f"  lens accessibility A(l) of the targets: {self.accessibility[0]:+.2f} at state 0, "
                         f"{self.accessibility[-1]:+.2f} at state {len(self.accessibility) - 1}; Spearman(efficacy, A) = "
                         f"{self.efficacy_access_spearman:+.3f} (p = {self.efficacy_access_p:.3g})")
        if self.extraction_efficacy:
            best = self.best_extraction
            lines.append("  extraction  cos with mean (range)   median efficacy  best at blocks  redshift vs none spread")
            for name, eff in self.efficacies.items():
                cos = self.extraction_cosine.get(name)
                steered = None if cos is None else cos[self.layers]
                span = "1 (itself)" if cos is None else f"{np.nanmin(steered):+.2f} .. {np.nanmax(steered):+.2f}"
                t = self.transfers[name]
                lines.append(f"  {name:<10}  {span:<22}  {np.nanmedian(eff):>15.2f}  {best.count(name):>3}/{len(best):<10}  "
                             f"{t.spread['redshift']:.2f} vs {t.spread['none']:.2f}")
        lines += [f"  {v.claim}: {v.measured} -> {v.verdict}" for v in self.verdicts(n_bootstrap=0)]
        if self.control is not None:
            c = self.control
            lines.append(f"  control (random weights): Spearman(efficacy, H) = {c.efficacy_h_spearman:+.3f}, "
                         f"(efficacy, A) = {c.efficacy_access_spearman:+.3f}; spreads "
                         + ", ".join(f"{n} {c.transfer.spread[n]:.2f}" for n in CORRECTIONS)
                         + f"; {c.transfer.n_reached}/{c.transfer.n_pairs} pairs reach E*")
        return "\n".join(lines)

    def figure(self):
        """Efficacy against H(l), native effect per block and size, alpha* per target under each correction, spreads;
        efficacy per block of each extraction, and the lens accessibility A(l) beside H(l)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=3, cols=2, vertical_spacing=0.1, horizontal_spacing=0.1,
                            specs=[[{"secondary_y": True}, {}], [{}, {}], [{}, {"secondary_y": True}]], subplot_titles=(
                                "efficacy per block (left) and H(l) (right)",
                                "native effect: logit-difference shift",
                                "alpha* / median, per target block (one point per source)",
                                "spread of log10 alpha* (95% bootstrap); control grey",
                                "efficacy per block, per extraction",
                                "lens accessibility A(l) of the targets (left) and H(l) (right)"))
        for name, eff in self.efficacies.items():
            fig.add_trace(go.Scatter(x=self.layers, y=eff, mode="lines+markers", name=f"efficacy: {name}"), row=3, col=1)
        for result, colour in [(self, None)] + ([(self.control, "grey")] if self.control is not None else []):
            fig.add_trace(go.Scatter(x=np.arange(len(result.accessibility)), y=result.accessibility, mode="lines",
                                     name="A(l)" + (" (control)" if colour else ""),
                                     line={"color": colour, "dash": "dot"} if colour else None), row=3, col=2)
        fig.add_trace(go.Scatter(x=np.arange(len(self.hubble)), y=self.hubble, mode="lines", name="H(l)", showlegend=False,
                                 line={"color": "firebrick"}), row=3, col=2, secondary_y=True)
        fig.add_trace(go.Scatter(x=self.layers, y=self.efficacy, mode="lines+markers", name="efficacy"), row=1, col=1)
        if self.control is not None:
            fig.add_trace(go.Scatter(x=self.control.layers, y=self.control.efficacy, mode="lines", name="efficacy (control)",
                                     line={"color": "grey", "dash": "dot"}), row=1, col=1)
        fig.add_trace(go.Scatter(x=np.arange(len(self.hubble)), y=self.hubble, mode="lines", name="H(l)",
                                 line={"color": "firebrick"}), row=1, col=1, secondary_y=True)
        fig.add_trace(go.Heatmap(z=self.effect, x=[f"r={r:g}" for r in self.relative], y=self.layers, colorscale="RdBu_r",
                                 zmid=0, colorbar={"title": "dLD", "len": 0.4, "y": 0.8}), row=1, col=2)
        t = self.transfer
        for name in CORRECTIONS:
            alpha = t.alpha[name]
            normalised = alpha / np.nanmedian(alpha) if np.isfinite(alpha).any() else alpha
            targets = np.broadcast_to(t.layers[None, :], alpha.shape)
            fig.add_trace(go.Scatter(x=targets.ravel(), y=normalised.ravel(), mode="markers", name=f"alpha*: {name}"),
                          row=2, col=1)
        results = [(self, None)] + ([(self.control, "grey")] if self.control is not None else [])
        for result, colour in results:
            s = result.transfer
            y = [s.spread[n] for n in CORRECTIONS]
            fig.add_trace(go.Bar(x=list(CORRECTIONS), y=y, name="spread" + (" (control)" if colour else ""),
                                 marker={"color": colour} if colour else None,
                                 error_y={"type": "data", "symmetric": False,
                                          "array": [s.spread_high[n] - v for n, v in zip(CORRECTIONS, y)],
                                          "arrayminus": [v - s.spread_low[n] for n, v in zip(CORRECTIONS, y)]}),
                          row=2, col=2)
        fig.update_yaxes(type="log", row=2, col=1)
        fig.update_xaxes(title_text="block l", row=1, col=1)
        fig.update_xaxes(title_text="target block t", row=2, col=1)
        fig.update_xaxes(title_text="block l", row=3, col=1)
        fig.update_xaxes(title_text="state l", row=3, col=2)
        fig.update_layout(title=f"Steering ({self.contrast}) across layers", template="plotly_white", height=1300,
                          barmode="group")
        return fig


def _low_h(r) -> tuple[str, bool | None]:
    if len(r.layers) < 4 or not np.isfinite(r.efficacy_h_spearman):
        return "fewer than 4 steered blocks", None
    return f"Spearman(efficacy, H) {r.efficacy_h_spearman:+.2f} (p {r.efficacy_h_p:.2g})", r.efficacy_h_spearman < 0


def _access_beats_h(r) -> tuple[str, bool | None]:
    if len(r.layers) < 4 or not (np.isfinite(r.efficacy_access_spearman) and np.isfinite(r.access_beats_h)):
        return "fewer than 4 steered blocks, or no accessibility measured", None
    return (f"Spearman(efficacy, A) {r.efficacy_access_spearman:+.2f} vs (efficacy, H) {r.efficacy_h_spearman:+.2f} "
            f"(|A| ahead in {r.access_beats_h:.0%} of block draws)"), r.access_beats_h >= 0.95


def _redshift_beats(other: str, extraction: str = "mean"):
    def test(r) -> tuple[str, bool | None]:
        t = r.transfers.get(extraction)
        if t is None:
            return f"the {extraction} extraction was not measured", None
        share = t.redshift_beats.get(other, np.nan)
        if t.n_reached < 3 or not np.isfinite(share):
            return f"{t.n_reached}/{t.n_pairs} pairs reach E*", None
        return f"spread {t.spread['redshift']:.2f} vs {t.spread[other]:.2f} ({share:.0%} of draws)", share >= 0.95
    return test


FLRW = citations.FLRW.source
CLAIMS = (
    # Cohen (1988): |r| = 0.1 is a small correlation; below it, negligible.
    Claim(FLRW, "5: low-H layers steer better", "Spearman(efficacy per block, H(l)) < 0 with Holm p < 0.05, |rho| >= 0.1",
          _low_h, p_value=lambda r: (r.efficacy_h_p, None), effect=lambda r: -r.efficacy_h_spearman, floor=0.1,
          effect_units="-Spearman rho"),
    Claim(FLRW, "6: redshift predicts steering transfer (vs none)",
          "spread of log10 alpha* under a(t)/a(s) below no correction's in >= 95% of bootstrap draws", _redshift_beats("none")),
    Claim(FLRW, "6: redshift beats norm matching",
          "spread under a(t)/a(s) below norm matching's in >= 95% of bootstrap draws", _redshift_beats("norm_match")),
    Claim(citations.LENSDYN.source, "lens accessibility of the targets predicts steering efficacy better than H(l)",
          "|Spearman(efficacy, A(l))| > |Spearman(efficacy, H(l))| in >= 95% of bootstrap draws over the steered blocks",
          _access_beats_h),
    *(Claim(FLRW, f"6 ({label} vectors): redshift predicts steering transfer (vs none)",
            "as for lensdyn's vectors, on this extraction's transfer test", _redshift_beats("none", name))
      for name, label in (("last", "last-token CAA"), ("pca", "paired-PCA repeng"))),
)
SteeringResult.claims = CLAIMS


# --- measurement ---------------------------------------------------------------------------


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    contrast="sentiment",
    layers=None,
    transfer_layers=None,
    relative=RELATIVE,
    extractions=("mean",),
    n_evaluation: int | None = None,
    n_bootstrap: int = 200,
    batch_rows: int = 128,
    seed: int = 0,
    progress: bool = False,
    **capture_kwargs,
) -> SteeringResult:
    """Steering with a contrast set's difference-of-means vectors, against ``a(l)`` and ``H(l)`` of ``prompts``.

    ``layers``: the blocks steered with their own vector (default all). ``transfer_layers``: the
    source and target grid of the transfer test (default 6 blocks spread over ``layers``).
    ``relative``: the relative norms tried. ``extractions``: the vectors steered and transferred
    (``EXTRACTIONS``; ``mean``, lensdyn's, always). ``n_evaluation``: use the contrast set's first
    evaluation prompts only. A ``Capture`` needs ``model=`` (the steered runs are run on it).
    ``progress`` shows a bar over the steered batches.
    """
    contrast = resolve_contrast(contrast)
    check_extractions(extractions)
    relative = np.asarray(sorted(relative), dtype=np.float64)
    if relative.size == 0 or relative[0] <= 0:
        raise ArgumentError(f"relative norms must be positive, not {relative.tolist()}")

    def measure_one(cap: Capture, model) -> SteeringResult:
        return _measure(cap, model, contrast, layers, transfer_layers, relative, extractions, n_evaluation, n_bootstrap,
                        batch_rows, seed, progress)

    return measure_with_control("steering", capture_or_model, prompts, STREAMS, measure_one, model=model, control=control,
                                needs_model="the steered runs are run on it", **capture_kwargs)


def _measure(cap, model, contrast: ContrastSet, layers, transfer_layers, relative, extractions, n_evaluation, n_bootstrap,
             batch_rows, seed, progress) -> SteeringResult:
    cap.require_streams(STREAMS)
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedArchitectureError(
            f"{cap.model_info.name} is not a causal language model: steering effects are read off next-token logits")
    n_layers = cap.n_layers
    layers = np.arange(n_layers) if layers is None else np.asarray(sorted(set(int(l) for l in layers)))
    if layers.size == 0 or layers[0] < 0 or layers[-1] >= n_layers:
        raise ArgumentError(f"steered blocks must lie in 0..{n_layers - 1}, not {layers.tolist()}")
    if transfer_layers is None:
        transfer_layers = layers[np.unique(np.linspace(0, len(layers) - 1, min(6, len(layers))).round().astype(int))]
    transfer_layers = np.asarray(sorted(set(int(l) for l in transfer_layers)))
    if transfer_layers.size < 2 or transfer_layers[0] < 0 or transfer_layers[-1] >= n_layers:
        raise ArgumentError(f"transfer needs at least 2 blocks in 0..{n_layers - 1}, not {transfer_layers.tolist()}")
    extractions = ("mean",) + tuple(dict.fromkeys(e for e in extractions if e != "mean"))  # lensdyn's always, first

    # Targets first: a multi-token target is a cheap error, before any forward pass.
    positive_ids, negative_ids = (torch.tensor(text_token_ids(model, t, "steering targets"))
                                  for t in (contrast.positive_targets, contrast.negative_targets))
    states = masked_tokens(cap.resid, cap.mask)
    a = scale_factor(token_norms(states))
    a_causal = scale_factor(metric_norms(states, model_causal_metric(model, name=CAUSAL_METRIC)))

    texts = contrast.positive + contrast.negative
    contrast_cap = capture(model, PromptSet(contrast.name, texts, tuple(f"{contrast.name}[{i}]" for i in range(len(texts)))),
                           streams=STREAMS, exclude=cap.exclude)
    is_positive = torch.arange(len(texts)) < len(contrast.positive)
    contrast_states = contrast_cap.resid[:n_layers]
    vectors = extraction_vectors(contrast_states, contrast_cap.mask, is_positive, extractions)
    accessibility = lens_accessibility(model, *class_means(prompt_means(contrast_states, contrast_cap.mask), is_positive),
                                       positive_ids, negative_ids)

    evaluation = contrast.evaluation[:n_evaluation]
    eval_cap = capture(model, PromptSet(f"{contrast.name}-evaluation", evaluation,
                                        tuple(f"eval[{i}]" for i in range(len(evaluation)))),
                       streams=STREAMS, exclude=cap.exclude)
    eval_norms = to_numpy(masked_mean(token_norms(eval_cap.resid[:n_layers]), eval_cap.mask).mean(1))
    last = eval_cap.token_mask.sum(1) - 1

    # Every extraction's vectors in one stack (extraction e's state l is row e * n_layers + l), so one sweep runs them all.
    pairs = [(int(l), int(l)) for l in layers]
    pairs += [(int(s), int(t)) for s in transfer_layers for t in transfer_layers if s != t or s not in layers]
    stacked = [(e * n_layers + s, t) for e in range(len(extractions)) for s, t in pairs]
    effect, kl = steering_sweep(model, torch.cat([vectors[e] for e in extractions]), stacked, relative, eval_norms,
                                eval_cap.tokens, last, positive_ids, negative_ids, batch_rows, progress)  # [pair, r, prompt]
    effect, kl = (x.reshape(len(extractions), len(pairs), *x.shape[1:]) for x in (effect, kl))
    native = slice(0, len(layers))
    grid_index = {pair: i for i, pair in enumerate(pairs)}
    grid = np.array([[grid_index[(int(s), int(t))] for t in transfer_layers] for s in transfer_layers])
    scales = {"redshift": redshift_factors(a, transfer_layers, transfer_layers),
              "redshift_causal": redshift_factors(a_causal, transfer_layers, transfer_layers)}
    transfers = {e: _transfer(effect[i], native, grid, relative, eval_norms, transfer_layers,
                              to_numpy(token_norms(vectors[e])), scales, n_bootstrap, seed)
                 for i, e in enumerate(extractions)}
    # A zero vector (CAA at the embeddings, where paired texts end on the same token) has no direction to steer along.
    efficacies = {e: np.where(to_numpy(token_norms(vectors[e][layers])) > 0, efficacy(relative, effect[i, native].mean(-1)),
                              np.nan) for i, e in enumerate(extractions)}

    bh = hubble(a)
    eff = efficacies["mean"]
    enough = len(layers) >= 3
    rho, p = stats.spearmanr(eff, bh[layers]) if enough else (np.nan, np.nan)
    rho_access, p_access = stats.spearmanr(eff, accessibility[layers]) if enough else (np.nan, np.nan)
    cosines = {e: _cosine(vectors[e], vectors["mean"]) for e in extractions[1:]}
    target, transfer = transfers["mean"]
    return SteeringResult(
        conventions=Conventions(
            aggregation="vectors: difference of per-prompt token means; effect: logit-difference shift at the last token, "
            f"mean over evaluation prompts; a(l) ratio of means over the capture's tokens; E* = {TARGET_FRACTION} x median "
            f"native maximum; {n_bootstrap} bootstrap draws over evaluation prompts; accessibility: logit lens of the "
            "class mean states; extractions beside it: " + (", ".join(extractions[1:]) or "none"),
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
            causal_metrics=(CAUSAL_METRIC,),
        ),
        provenance=Provenance.from_capture(cap),
        contrast=contrast.name,
        positive_targets=contrast.positive_targets,
        negative_targets=contrast.negative_targets,
        n_evaluation=len(evaluation),
        a=a, a_causal=a_causal, hubble=bh,
        eval_norms=eval_norms,
        vector_norms=to_numpy(token_norms(vectors["mean"])),
        layers=layers,
        relative=relative,
        effect=effect[0, native].mean(-1),
        kl=kl[0, native].mean(-1),
        efficacy=eff,
        efficacy_h_spearman=float(rho),
        efficacy_h_p=float(p),
        target_effect=target,
        transfer=transfer,
        accessibility=accessibility,
        efficacy_access_spearman=float(rho_access),
        efficacy_access_p=float(p_access),
        access_beats_h=share_more_predictive(eff, accessibility[layers], bh[layers], n_bootstrap, seed) if enough
        else float("nan"),
        extraction_efficacy={e: efficacies[e] for e in extractions[1:]},
        extraction_cosine=cosines,
        extraction_transfer={e: transfers[e][1] for e in extractions[1:]},
    )


def _cosine(x: Float[Tensor, "state d_model"], y: Float[Tensor, "state d_model"]) -> Float[np.ndarray, " state"]:
    """Cosine per state, NaN where either vector is zero (no direction)."""
    norms = token_norms(x) * token_norms(y)
    return to_numpy(torch.where(norms > 0, (x * y).sum(-1) / norms, torch.nan))


def _transfer(effect: np.ndarray, native: slice, grid: np.ndarray, relative: np.ndarray, eval_norms: np.ndarray,
              transfer_layers: np.ndarray, vector_norms: np.ndarray, scales: dict[str, np.ndarray], n_bootstrap: int,
              seed: int) -> tuple[float, Transfer]:
    """``(E*, Transfer)`` of one extraction's sweep ``effect[pair, r, prompt]`` (module docstring)."""
    magnitudes = relative[None, None, :] * eval_norms[None, transfer_layers, None]  # [source, target, r]

    def transfer_from(mean_effect: np.ndarray) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
        target = TARGET_FRACTION * float(np.median(mean_effect[native].max(-1)))
        needed = magnitude_for_effect(magnitudes, mean_effect[grid], target)
        return target, transfer_alphas(needed, vector_norms[transfer_layers], scales, eval_norms[transfer_layers]), needed

    target, alpha, needed = transfer_from(effect.mean(-1))
    draws = _bootstrap(effect, transfer_from, n_bootstrap, seed)
    return target, Transfer(
        layers=transfer_layers,
        magnitude=needed,
        alpha=alpha,
        spread={name: log_spread(alpha[name]) for name in CORRECTIONS},
        spread_low={n: float(np.nanpercentile(draws[n], 2.5)) if np.isfinite(draws[n]).any() else np.nan
                    for n in CORRECTIONS},
        spread_high={n: float(np.nanpercentile(draws[n], 97.5)) if np.isfinite(draws[n]).any() else np.nan
                     for n in CORRECTIONS},
        redshift_beats={n: _share_below(draws["redshift"], draws[n]) for n in CORRECTIONS if n != "redshift"},
        n_reached=int(np.isfinite(needed).sum()),
        n_pairs=int(needed.size),
    )


def steering_sweep(
    model,
    vectors: Float[Tensor, "state d_model"],
    pairs: list[tuple[int, int]],
    relative: Float[np.ndarray, " r"],
    norms: Float[np.ndarray, " block"],
    tokens: Int[Tensor, "prompt pos"],
    last: Int[Tensor, " prompt"],
    positive_ids: Int[Tensor, " k"],
    negative_ids: Int[Tensor, " j"],
    batch_rows: int = 128,
    progress: bool = False,
) -> tuple[Float[np.ndarray, "pair r prompt"], Float[np.ndarray, "pair r prompt"]]:
    """Effect and KL for every ``(source, target)`` pair, relative norm and prompt (right-padded rows).

    Row ``(pair, r, prompt)`` adds ``r * norms[target] * vectors[source] / ||vectors[source]||`` at
    block ``target``; ``batch_rows`` rows share one forward pass.
    """
    baseline = last_logits(model, tokens, last=last)
    directions = torch.nn.functional.normalize(vectors, dim=-1)
    n_prompts = tokens.shape[0]
    rows = [(i, j, k) for i in range(len(pairs)) for j in range(len(relative)) for k in range(n_prompts)]
    effect = np.zeros((len(pairs), len(relative), n_prompts))
    kl = np.zeros_like(effect)
    baseline_ld = logit_difference(baseline, positive_ids, negative_ids)
    for start in track(range(0, len(rows), batch_rows), "steering", unit="batch", enabled=progress, leave=False):
        chunk = rows[start:start + batch_rows]
        prompt = torch.tensor([k for _, _, k in chunk])
        additions: dict[int, Tensor] = {}
        for row, (i, j, _) in enumerate(chunk):
            source, target = pairs[i]
            added = additions.setdefault(target, torch.zeros(len(chunk), vectors.shape[-1], dtype=torch.float64,
                                                             device=vectors.device))
            added[row] = relative[j] * norms[target] * directions[source]
        logits = steered_last_logits(model, tokens[prompt], last[prompt], additions)
        index = tuple(torch.tensor(c) for c in zip(*chunk))
        effect[index] = to_numpy(logit_difference(logits, positive_ids, negative_ids) - baseline_ld[prompt])
        kl[index] = to_numpy(kl_divergence(baseline[prompt], logits))
    return effect, kl


def _bootstrap(effect: np.ndarray, transfer_from, n_bootstrap: int, seed: int) -> dict[str, np.ndarray]:
    """Spread of every correction over ``n_bootstrap`` resamplings of the evaluation prompts."""
    rng = np.random.default_rng(seed)
    n_prompts = effect.shape[-1]
    draws = {name: np.full(n_bootstrap, np.nan) for name in CORRECTIONS}
    for b in range(n_bootstrap):
        _, alpha, _ = transfer_from(effect[..., rng.integers(0, n_prompts, n_prompts)].mean(-1))
        for name in CORRECTIONS:
            draws[name][b] = log_spread(alpha[name])
    return draws


def _share_below(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    return float((x[ok] < y[ok]).mean()) if ok.any() else float("nan")


@dataclass(frozen=True)
class SteeringParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    contrast: str = option("sentiment", "built-in contrast set (sentiment, formality) or a JSON file", contrast=True)
    layers: tuple[int, ...] | None = option(None, "blocks steered with their own vector (default all)",
                                            flag="--steer-layers", blocks=True)
    transfer_layers: tuple[int, ...] | None = option(
        None, "source/target blocks of the transfer test (default 6 spread over the steered blocks)", blocks=True, distinct=2)
    relative: tuple[float, ...] = option(RELATIVE, "sizes tried, as ||added vector|| / mean residual norm at the block",
                                         positive=True)
    # Each extraction is another full sweep (2.5x the time for all three): the comparison is asked for.
    extractions: tuple[str, ...] = option(("mean",), "steering vectors steered and transferred: mean (lensdyn's, always), "
                                          "last (CAA), pca (repeng)", choices=EXTRACTIONS)
    n_bootstrap: int = option(200, "bootstrap draws over evaluation prompts", flag="--bootstrap", at_least=1)


ANALYSIS = Analysis(
    name="steering",
    help="difference-of-means steering per block against H(l); redshift vs norm-matching transfer between blocks",
    heading="Steering across layers",
    order=70,
    streams=STREAMS,
    result=SteeringResult,
    measure=measure,
    parameters=SteeringParameters,
    opt_in=True,  # every steered size of every block is a forward pass of the evaluation prompts
    causal="steering effects are read off next-token logits",
)
