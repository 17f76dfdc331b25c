"""A lens on every state: each residual state decoded through the final norm and the unembedding.

The logit lens (nostalgebraist 2020; TransformerLens' ``accumulated_resid`` + ``apply_ln_to_stack``)
reads state ``l`` as if it were the last: ``logits_l = W_U norm_f(x_l)``, with the model's own final
norm and unembedding (``lensdyn.hooks.patching.final_logits``), on the states the capture already
holds: no second forward pass. State ``n_layers`` is the last block's output before the final norm
(``lensdyn.conventions``, 1), so its decoding *is* the model's output distribution ``q``; every
state is compared with it, per token, over the tokens in ``capture.mask``:

- ``kl[l] = mean_t KL(q_t || p_lt) = mean_t sum_v q_tv (log q_tv - log p_ltv)`` (nats);
- ``rank[l]``: where the output's top token ``argmax_v q_tv`` sits in ``p_lt`` (0: it is the top;
  the count of tokens with a strictly larger logit), as the mean, the mean of ``ln(1 + rank)``
  (``log_rank``; ``exp(log_rank) - 1`` is the geometric-mean rank) and ``top1``, the share at rank 0;
- ``entropy[l] = mean_t -sum_v p_ltv log p_ltv`` (nats);
- the top-``k`` tokens of ``p_l`` at one position (``lens_position`` of the first prompt, by
  default its last token, excluded or not), with their probabilities.

Precision: the unembedding runs in the model's dtype (float32 logits), and so do the lens's
elementwise steps (one ``exp`` per logit, ``lens_statistics``) and its sums over the vocabulary
(pairwise sums, relative round-off ~1e-7); every sum over tokens and the
statistics are float64, and so is the output distribution ``q``. A float32 logit carries a
relative error of about 1e-7, so KL and entropy are exact to a few 1e-6 nats against a float64
decoding of the same states (tested to 1e-5), equal to a token-by-token brute-force loop to that
round-off (tested), and the last state's KL is 0 with rank 0 by construction. The decoded last
state equals the model's forward-pass logits to float32 round-off (tested).

Cost and the token subsample: every state costs one unembedding of every decoded token (the
unembedding is a fifth of SmolLM2's parameters), and its softmax over 49,152 words: decoding every
included token of the diverse set (1,322) takes 38 s on 2 cores, about 14 bare forward passes of
those prompts. The lens therefore decodes ``lens_tokens`` (default 256) of the included tokens,
drawn without replacement under the run's ``seed`` (``lensdyn.resampling.token_subsample``; the
same positions for the model and its control, whose masks are the model's), and says so in its
conventions and summary; ``lens_tokens=0`` decodes every token. Measured on smollm2-135m's diverse
set (seeds 0 and 1): 256 tokens take 7.5 s and put every state's mean KL within 3-6% of every
token's (128: 3.8 s, 7-11%; 512: 15 s, 2-3%), and the convergence verdict is the same at each size.
The statistics are means over the drawn tokens; the bootstrap still resamples prompts, each with
its drawn tokens.

Memory: ``vocab x tokens x states`` logits do not fit (SmolLM2: 49,152 x 1,331 x 31 float32 is
8 GB), so the lens streams: ``CHUNK`` tokens at a time, the output's log-probabilities once per
chunk, then one state at a time; the peak is a few ``CHUNK x vocab`` float64 arrays (about 100 MB
each on SmolLM2), whatever the number of tokens.

**Affine lens** (``affine_lens=True``): per state one affine map ``x_l W_l + b_l`` to the last
state, fitted by ridge regression in closed form from streamed float64 moments
(``lensdyn.streaming.RegressionStats``, ridge ``lens_ridge`` relative to the mean eigenvalue of
the state's input co-moment) on every included token of the even-numbered prompts (0, 2, ...), and
reported on the others, held out (on their drawn tokens): the KL of ``norm_f(x_l W_l + b_l)`` decoded to the output distribution, its top-1 share,
``R^2 = 1 - SSE / SST`` of the predicted last state (``SST`` about the held-out tokens' mean), and
the logit lens's KL on the same held-out tokens beside it. This is the tuned lens' idea (Belrose
et al. 2023, who fit a translator per layer by SGD on the KL) in closed form, on the residual.

Encoders are not decoded: ``minilm-l6``'s checkpoint carries no masked-LM head (the bridge's
would be freshly initialised), so the analysis declares ``causal``.

``resample(rng)`` re-pools per-prompt sums of every per-state statistic on prompts drawn with
replacement (``lensdyn.resampling``); the affine lens's map stays the one fitted, and only its
held-out prompts enter its resampled fit.

>>> result = lens.measure(ld.load_model("smollm2-135m"), "diverse")     # doctest: +SKIP
>>> print(result.summary())                                             # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensdyn import citations
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import Capture
from lensdyn.hooks.patching import final_logits
from lensdyn.ops import Scratch, prompt_index, to_numpy
from lensdyn.resampling import prompt_counts, prompt_sums, token_subsample
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.streaming import RegressionStats
from lensdyn.verdicts import Claim

STREAMS = ("resid",)
CHUNK = 256  # tokens decoded at once: bounds the CHUNK x vocab arrays (module docstring: memory)
STATISTICS = ("kl", "entropy", "rank", "log_rank", "top1")  # per-token statistics, summed per prompt
AFFINE_STATISTICS = ("kl", "top1", "sse")
TOP_K = 5
RIDGE = 0.1
LENS_TOKENS = 256  # tokens decoded per run (module docstring: cost and the token subsample)


# --- pure functions of tensors -------------------------------------------------------------


class OutputDistribution(NamedTuple):
    """The model's output distribution ``q`` over a chunk of tokens, as every state's lens is compared with it."""

    probs: Float[Tensor, "token vocab"]  # q, in the logits' dtype: the lens's products run in it
    neg_entropy: Float[Tensor, " token"]  # sum_v q_v log q_v, float64
    top: Int[Tensor, " token"]  # argmax_v q_v


def output_distribution(logits: Float[Tensor, "token vocab"]) -> OutputDistribution:
    """``q = softmax(logits)`` (in float64), its ``sum q log q`` and its top token.

    >>> out = output_distribution(torch.tensor([[0., 0.], [9., 0.]]))
    >>> round(-float(out.neg_entropy[0]), 4), out.top.tolist()       # H(uniform on 2) = ln 2
    (0.6931, [0, 0])
    """
    log_q = logits.double().log_softmax(dim=-1)
    q = log_q.exp()
    return OutputDistribution(q.to(logits.dtype), (q * log_q).sum(dim=1), log_q.argmax(dim=1))


def lens_statistics(
    logits: Float[Tensor, "token vocab"], output: OutputDistribution, scratch: Scratch | None = None
) -> dict[str, Float[Tensor, " token"]]:
    """Per token: ``KL(q || p)``, ``H(p)``, the rank of ``output.top`` in ``logits``, ``ln(1 + rank)`` and ``rank == 0``.

    With ``u = z - max z`` and ``S = sum exp(u)`` (so ``log p = u - log S``):
    ``H(p) = log S - sum exp(u) u / S`` and ``KL(q || p) = sum q log q - sum q u + log S``.
    One ``exp`` of the logits, two dot products per token: the elementwise work and the sums over the
    vocabulary run in the logits' dtype, the results are float64 (module docstring: precision). Rank
    counts the logits strictly above the top token's. The token x vocab temporaries go into
    ``scratch`` (``lensdyn.ops.Scratch``; pass one across calls to reuse them).

    >>> z = torch.tensor([[0., 0., 0., 0.], [2., 1., 0., 0.]])
    >>> q = output_distribution(torch.tensor([[0., 0., 0., 0.], [1., 2., 0., 0.]]))   # row 2: the output's top is token 1
    >>> s = lens_statistics(z, q)
    >>> round(float(s["kl"][0]), 6), round(float(s["entropy"][0]), 4), s["rank"].tolist()     # H(uniform on 4) = ln 4
    (0.0, 1.3863, [0.0, 1.0])
    """
    scratch = Scratch() if scratch is None else scratch
    # The rank counts 0/1 floats: a float32 sum of integers is exact below 2^24 (any vocabulary), and 7x faster on a
    # CPU than summing bools, which torch does not vectorise. The float32 sum of exp(u) is a thirtieth of a float64
    # one's time, and its round-off (~4e-7 in log S, measured on smollm2-135m) is within the float32 logits' own.
    above = torch.gt(logits, logits.gather(1, output.top[:, None]), out=scratch.like("above", logits, torch.float32))
    rank = above.sum(dim=1).double()
    shifted = torch.sub(logits, logits.amax(dim=1, keepdim=True), out=scratch.like("shifted", logits))
    weights = torch.exp(shifted, out=scratch.like("weights", logits))
    total = weights.sum(dim=1, dtype=torch.promote_types(weights.dtype, torch.float32)).double()
    log_total = total.log()
    # Each dot product as a product into scratch, then its sum: torch.linalg.vecdot's own steps, bit for bit.
    product = scratch.like("product", logits)
    q_dot_u = torch.mul(output.probs, shifted, out=product).sum(dim=1).double()
    w_dot_u = torch.mul(weights, shifted, out=product).sum(dim=1).double()
    return {
        "kl": output.neg_entropy - q_dot_u + log_total,
        "entropy": log_total - w_dot_u / total,
        "rank": rank,
        "log_rank": torch.log1p(rank),
        "top1": (rank == 0).double(),
    }


def own_statistics(output: OutputDistribution) -> dict[str, Float[Tensor, " token"]]:
    """``lens_statistics`` of the output against itself, exactly: KL 0, ``H(q)``, rank 0 (the last state, by construction).

    >>> own_statistics(output_distribution(torch.tensor([[0., 0.]])))["kl"].tolist()
    [0.0]
    """
    zero = torch.zeros_like(output.neg_entropy)
    return {"kl": zero, "entropy": -output.neg_entropy, "rank": zero, "log_rank": zero, "top1": zero + 1}


def apply_affine(
    x: Float[Tensor, "token d_model"], weight: Float[Tensor, "d_model d_model"], bias: Float[Tensor, " d_model"]
) -> Float[Tensor, "token d_model"]:
    """``x W + b`` in float64.

    >>> apply_affine(torch.tensor([[1., 2.]]), torch.eye(2, dtype=torch.float64) * 2, torch.ones(2, dtype=torch.float64))
    tensor([[3., 5.]], dtype=torch.float64)
    """
    return x.to(torch.float64) @ weight + bias


def decode_states(
    model, resid: Float[Tensor, "state token d_model"],
    maps: tuple[Float[Tensor, "state d_model d_model"], Float[Tensor, "state d_model"]] | None = None,
    chunk: int = CHUNK,
) -> dict[str, Float[Tensor, "state token"]]:
    """``lens_statistics`` of every state of every token against the last state's decoding (module docstring).

    With ``maps = (W, b)`` state ``l`` is decoded as ``x_l W_l + b_l`` (the affine lens), and
    ``"sse"``, ``||x_L - (x_l W_l + b_l)||^2``, is returned too. Streams over ``chunk`` tokens,
    then over states.
    """
    n_states, n_tokens = resid.shape[:2]
    names = STATISTICS + (("sse",) if maps is not None else ())
    out = {name: torch.empty(n_states, n_tokens, dtype=torch.float64) for name in names}
    scratch = Scratch()
    for start in range(0, n_tokens, chunk):
        rows = slice(start, start + chunk)
        target = resid[-1, rows]
        output = output_distribution(final_logits(model, target))
        for l in range(n_states):
            x = resid[l, rows]
            if maps is not None:
                predicted = apply_affine(x, maps[0][l], maps[1][l])
                out["sse"][l, rows] = ((predicted - target.to(torch.float64)) ** 2).sum(dim=1)
                x = predicted
            own = maps is None and l == n_states - 1  # the last state decodes to the output itself
            stats = own_statistics(output) if own else lens_statistics(final_logits(model, x), output, scratch)
            for name, values in stats.items():
                out[name][l, rows] = values
    return out


def fit_affine(
    resid: Float[Tensor, "state token d_model"], ridge: float, chunk: int = CHUNK
) -> tuple[Float[Tensor, "state d_model d_model"], Float[Tensor, "state d_model"]]:
    """Ridge maps ``x_l -> x_L`` per state (``lensdyn.streaming.RegressionStats.ridge``), streamed over ``chunk`` tokens.

    >>> x = torch.randn(2, 40, 3, dtype=torch.float64)
    >>> x[1] = x[0] @ torch.diag(torch.tensor([1., 2., 3.], dtype=torch.float64)) - 1    # last state affine in the first
    >>> w, b = fit_affine(x, ridge=0.0)
    >>> torch.allclose(apply_affine(x[0], w[0], b[0]), x[1])
    True
    """
    stats = RegressionStats()
    for start in range(0, resid.shape[1], chunk):
        x = resid[:, start: start + chunk]
        stats.update(x, x[-1:].expand_as(x))
    weight, bias = stats.ridge(ridge)
    return torch.from_numpy(weight), torch.from_numpy(bias)


def pooled_means(
    parts: Float[np.ndarray, "statistic prompt state"], tokens: Float[np.ndarray, " prompt"], counts: Float[np.ndarray, " prompt"]
) -> Float[np.ndarray, "statistic state"]:
    """``sum_p c_p S[p] / sum_p c_p n_p`` for each statistic: token means on a resample (``c = 1``: the data).

    >>> pooled_means(np.array([[[2.], [9.]]]), np.array([1., 3.]), np.array([1., 1.])).tolist()
    [[2.75]]
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a held-out prompt: NaN
        return np.einsum("p,kps->ks", counts, parts) / (counts @ tokens)


def r_squared(
    sse: Float[np.ndarray, "prompt state"], target_sum: Float[np.ndarray, "prompt d_model"],
    target_square: Float[np.ndarray, " prompt"], tokens: Float[np.ndarray, " prompt"], counts: Float[np.ndarray, " prompt"],
) -> Float[np.ndarray, " state"]:
    """``1 - SSE / SST`` pooled over prompts weighted by ``counts``, ``SST = sum ||y||^2 - ||sum y||^2 / N``.

    >>> y = np.array([[1., 0.], [3., 0.]])                 # two one-token prompts: SST = 2
    >>> r_squared(np.array([[0.5], [0.5]]), y, (y ** 2).sum(1), np.ones(2), np.ones(2)).tolist()
    [0.5]
    """
    n = counts @ tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        sst = counts @ target_square - ((counts @ target_sum) ** 2).sum() / n
        return 1 - (counts @ sse) / sst


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineLens:
    """The affine lens fitted on ``train_prompts`` and measured on ``held_prompts`` (arrays index states)."""

    ridge: float
    train_prompts: tuple[int, ...]
    held_prompts: tuple[int, ...]
    kl: Float[np.ndarray, " state"]  # held-out mean KL(output || affine lens)
    top1: Float[np.ndarray, " state"]
    r2: Float[np.ndarray, " state"]  # of the predicted last state
    logit_kl: Float[np.ndarray, " state"]  # the logit lens on the same held-out tokens
    prompt_parts: Float[np.ndarray, "statistic prompt state"]  # AFFINE_STATISTICS summed per prompt (0 off the held-out)
    target_sum: Float[np.ndarray, "prompt d_model"]  # per prompt: sum of the last state, and of its squared norm
    target_square: Float[np.ndarray, " prompt"]


@dataclass(frozen=True, eq=False)
class LensResult(Result):
    """The lens per state (``0..n_layers``); ``control`` holds the untrained model's, measured alike."""

    kl: Float[np.ndarray, " state"]  # mean KL(output || lens), nats
    entropy: Float[np.ndarray, " state"]  # mean entropy of the lens, nats
    rank: Float[np.ndarray, " state"]  # mean rank of the output's top token
    log_rank: Float[np.ndarray, " state"]  # mean ln(1 + rank)
    top1: Float[np.ndarray, " state"]  # share of tokens whose lens top token is the output's
    prompt_parts: Float[np.ndarray, "statistic prompt state"]  # STATISTICS summed per prompt
    prompt_tokens: Float[np.ndarray, " prompt"]  # decoded tokens per prompt
    n_decoded: int  # tokens decoded (the subsample's size; every included token when lens_tokens = 0)
    position: int  # of the first prompt: where top_tokens are read
    position_token: str
    top_tokens: tuple[tuple[str, ...], ...]  # [state][k]
    top_probs: Float[np.ndarray, "state k"]
    affine: AffineLens | None = None
    control: "LensResult | None" = None

    @property
    def n_layers(self) -> int:
        return len(self.kl) - 1

    def resample(self, rng: np.random.Generator) -> "LensResult":
        """Every per-state statistic on prompts drawn with replacement, from the per-prompt sums."""
        counts = prompt_counts(rng, len(self.prompt_tokens)).astype(np.float64)
        a = self.affine
        affine = None if a is None else dataclasses.replace(a, **affine_fields(
            a.prompt_parts, a.target_sum, a.target_square, a.held_prompts, self.prompt_parts, self.prompt_tokens, counts))
        return dataclasses.replace(self, **lens_fields(self.prompt_parts, self.prompt_tokens, counts), affine=affine)

    def summary(self) -> str:
        p, c, a = self.provenance, self.control, self.affine
        lines = [
            f"Lens: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, {self.n_decoded} of "
            f"{p.n_tokens} tokens decoded; "
            f"KL(output || lens) and entropy in nats, rank of the output's top token; top tokens at position "
            f"{self.position} of prompt 0 ({self.position_token!r})",
            f"{'state':>5} {'KL':>8} {'top1':>6} {'geo rank':>9} {'entropy':>8}"
            + (f" {'ctrl KL':>8} {'ctrl top1':>9}" if c is not None else "")
            + (f" {'aff KL':>8} {'logit KL':>8} {'aff R^2':>8}" if a is not None else "") + "  top tokens",
        ]
        for l in range(len(self.kl)):
            row = f"{l:>5} {self.kl[l]:>8.3f} {self.top1[l]:>6.2f} {np.expm1(self.log_rank[l]):>9.1f} {self.entropy[l]:>8.3f}"
            if c is not None:
                row += f" {c.kl[l]:>8.3f} {c.top1[l]:>9.2f}"
            if a is not None:
                row += f" {a.kl[l]:>8.3f} {a.logit_kl[l]:>8.3f} {a.r2[l]:>8.3f}"
            lines.append(row + "  " + " ".join(repr(t) for t in self.top_tokens[l][:3]))
        if a is not None:
            lines.append(f"affine lens: ridge {a.ridge:g} (relative), fitted on prompts {list(a.train_prompts)}, "
                         f"held out {list(a.held_prompts)}")
        return "\n".join(lines)

    def figure(self):
        """KL and geometric-mean rank per state (log axes), entropy, and the top tokens at the position; control grey."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=2, cols=2, subplot_titles=(
            "KL(output || lens) per state (nats)", "rank of the output's top token (geometric mean + 1)",
            "entropy of the lens (nats)", f"top tokens at position {self.position} of prompt 0 ({self.position_token!r})"))
        for result, colour in ((self, "#1f77b4"), (self.control, "#7f7f7f")):
            if result is None:
                continue
            tag = f"{result.provenance.model} ({result.provenance.weights})"
            states = np.arange(len(result.kl))
            style = {"mode": "lines+markers", "line": {"color": colour}, "legendgroup": tag}
            # The last state's KL is 0 by construction: a log axis draws the states before it.
            fig.add_trace(go.Scatter(x=states[:-1], y=result.kl[:-1], name=f"{tag}: logit lens", **style), row=1, col=1)
            fig.add_trace(go.Scatter(x=states, y=np.exp(result.log_rank), name=f"{tag}: rank", showlegend=False, **style),
                          row=1, col=2)
            fig.add_trace(go.Scatter(x=states, y=result.entropy, name=f"{tag}: entropy", showlegend=False, **style),
                          row=2, col=1)
            if result.affine is not None:
                fig.add_trace(go.Scatter(x=states[:-1], y=result.affine.kl[:-1], name=f"{tag}: affine lens (held out)",
                                         mode="lines", line={"color": colour, "dash": "dash"}, legendgroup=tag), row=1, col=1)
        k = self.top_probs.shape[1]
        fig.add_trace(go.Heatmap(
            z=self.top_probs, x=[f"#{i + 1}" for i in range(k)], y=np.arange(len(self.kl)),
            text=[list(row) for row in self.top_tokens], texttemplate="%{text}", colorscale="Blues",
            colorbar={"title": "p", "x": 1.02, "y": 0.22, "len": 0.45}, hovertemplate="state %{y}: %{text} p=%{z:.3f}<extra></extra>",
        ), row=2, col=2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_yaxes(type="log", row=1, col=2)
        for row, col in ((1, 1), (1, 2), (2, 1)):
            fig.update_xaxes(title_text="state l", row=row, col=col)
        fig.update_yaxes(title_text="state l", row=2, col=2)
        fig.update_layout(title="Logit lens: every state decoded through the final norm and the unembedding",
                          template="plotly_white", height=900)
        return fig


LOGIT_LENS = citations.LOGIT_LENS.source
TUNED_LENS = citations.TUNED_LENS.source
CLAIMS = (
    Claim(LOGIT_LENS, "the lens converges on the output with depth",
          "mean KL to the output falls from each state to the next over the second half of the states (l >= n_layers / 2)",
          lambda r: (f"KL {r.kl[r.n_layers // 2]:.2f} at state {r.n_layers // 2} -> {r.kl[-2]:.2f} at state {r.n_layers - 1}; "
                     f"{int((np.diff(r.kl[r.n_layers // 2:]) >= 0).sum())} rises",
                     bool(np.all(np.diff(r.kl[r.n_layers // 2:]) < 0)))),
    Claim(TUNED_LENS, "an affine map per state decodes closer than the logit lens",
          "held-out KL of the affine lens below the logit lens's on the same tokens at every state before the last "
          "(needs --affine-lens)",
          lambda r: ("no affine lens", None) if r.affine is None else (
              f"{int((r.affine.kl[:-1] < r.affine.logit_kl[:-1]).sum())}/{r.n_layers} states",
              bool(np.all(r.affine.kl[:-1] < r.affine.logit_kl[:-1])))),
)
LensResult.claims = CLAIMS


def lens_fields(parts: Float[np.ndarray, "statistic prompt state"], tokens: Float[np.ndarray, " prompt"],
                counts: Float[np.ndarray, " prompt"]) -> dict[str, np.ndarray]:
    """The ``LensResult`` per-state means pooled from per-prompt sums (measure and resample share it)."""
    return dict(zip(STATISTICS, pooled_means(parts, tokens, counts)))


def held_counts(held_prompts: tuple[int, ...], counts: Float[np.ndarray, " prompt"]) -> Float[np.ndarray, " prompt"]:
    """``counts`` on the held-out prompts, 0 on the training ones.

    >>> held_counts((1,), np.array([2., 1., 3.])).tolist()
    [0.0, 1.0, 0.0]
    """
    keep = np.zeros(len(counts))
    keep[list(held_prompts)] = 1.0
    return counts * keep


def affine_fields(parts: Float[np.ndarray, "statistic prompt state"], target_sum: Float[np.ndarray, "prompt d_model"],
                  target_square: Float[np.ndarray, " prompt"], held_prompts: tuple[int, ...],
                  lens_parts: Float[np.ndarray, "lens_statistic prompt state"], tokens: Float[np.ndarray, " prompt"],
                  counts: Float[np.ndarray, " prompt"]) -> dict[str, np.ndarray]:
    """The ``AffineLens`` held-out statistics pooled over the held-out prompts in ``counts`` (measure and resample)."""
    held = held_counts(held_prompts, counts)
    kl, top1, sse = parts
    means = pooled_means(np.stack([kl, top1]), tokens, held)
    return dict(kl=means[0], top1=means[1], logit_kl=pooled_means(lens_parts[:1], tokens, held)[0],
                r2=r_squared(sse, target_sum, target_square, tokens, held))


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    lens_position: int = -1,
    lens_top_k: int = TOP_K,
    affine_lens: bool = False,
    lens_ridge: float = RIDGE,
    lens_tokens: int = LENS_TOKENS,
    seed: int = 0,
    **capture_kwargs,
) -> LensResult:
    """The lens of a model (captured here) or of a ``Capture`` holding ``resid`` (then ``model=`` too).

    ``control="random"`` (default) measures the untrained twin on the same prompts alike; a
    ``LensResult`` is attached as is; None skips it. ``lens_tokens`` of the included tokens are
    decoded, drawn under ``seed`` (0: every token; module docstring).
    """
    if lens_top_k < 1:
        raise ArgumentError(f"lens_top_k must be at least 1, got {lens_top_k}")
    if not (np.isfinite(lens_ridge) and lens_ridge >= 0):
        raise ArgumentError(f"lens_ridge must be finite and >= 0, got {lens_ridge}")
    if lens_tokens < 0:
        raise ArgumentError(f"lens_tokens must be at least 0 (0: every token), got {lens_tokens}")

    def measure_one(cap: Capture, model) -> LensResult:
        return _measure_capture(cap, model, lens_position, lens_top_k, affine_lens, lens_ridge, lens_tokens, seed)

    return measure_with_control("lens", capture_or_model, prompts, STREAMS, measure_one, model=model, control=control,
                                needs_model="the lens decodes through the model's final norm and unembedding",
                                **capture_kwargs)


def _measure_capture(cap: Capture, model, position: int, top_k: int, affine: bool, ridge: float, n_decode: int,
                     seed: int) -> LensResult:
    cap.require_streams(STREAMS)
    if not bool(cap.mask.any()):
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise ArgumentError(f"lens: {cap.model_info.name} is not a causal language model: {ANALYSIS.causal}")
    drawn = token_subsample(cap.n_tokens, n_decode, seed)
    owners = to_numpy(prompt_index(cap.mask))[drawn]
    decoded = cap.tokens_of("resid")[:, torch.from_numpy(drawn)]
    tokens = np.bincount(owners, minlength=cap.n_prompts).astype(np.float64)
    per_token = decode_states(model, decoded)
    parts = np.stack([prompt_sums(to_numpy(per_token[name]), owners, cap.n_prompts) for name in STATISTICS])
    ones = np.ones(cap.n_prompts)
    which = (f"every included token ({len(drawn)})" if len(drawn) == cap.n_tokens else
             f"{len(drawn)} of the {cap.n_tokens} included tokens, drawn without replacement (seed {seed})")
    return LensResult(
        conventions=Conventions(
            aggregation=f"mean over the decoded tokens pooled: {which} (per-prompt sums kept for the bootstrap); "
            "KL(output || lens) in nats, float32 logits, float64 softmax and sums",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        prompt_parts=parts,
        prompt_tokens=tokens,
        n_decoded=len(drawn),
        affine=_affine_lens(cap, model, ridge, parts, tokens, decoded, owners) if affine else None,
        **_top_tokens(cap, model, position, top_k),
        **lens_fields(parts, tokens, ones),
    )


def _top_tokens(cap: Capture, model, position: int, k: int) -> dict:
    """The top-``k`` tokens of every state's lens at ``position`` of the first prompt."""
    length = cap.lengths[0]
    if not -length <= position < length:
        raise ArgumentError(f"lens_position {position} is outside the first prompt ({length} tokens)")
    position %= length
    probs = final_logits(model, cap.prompt_of("resid", 0)[:, position]).double().softmax(dim=-1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    tokenizer = getattr(model, "tokenizer", None)
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else str
    return dict(position=position, position_token=cap.str_tokens[0][position],
                top_tokens=tuple(tuple(decode(int(i)) for i in row) for row in top.indices),
                top_probs=to_numpy(top.values))


def _affine_lens(cap: Capture, model, ridge: float, lens_parts: np.ndarray, tokens: np.ndarray,
                 decoded: Float[Tensor, "state token d_model"], decoded_owners: Int[np.ndarray, " token"]) -> AffineLens:
    """Fit on every included token of the even-numbered prompts, measure on the decoded tokens of the odd-numbered
    ones, the logit lens's own (module docstring)."""
    if cap.n_prompts < 2:
        raise ArgumentError("the affine lens needs at least 2 prompts: it is fitted on some and measured on the others")
    train, held = tuple(range(0, cap.n_prompts, 2)), tuple(range(1, cap.n_prompts, 2))
    train_mask = cap.mask.clone()
    train_mask[list(held)] = False
    on_held = decoded_owners % 2 == 1
    if not (bool(train_mask.any()) and on_held.any()):
        raise ArgumentError("the affine lens needs included tokens in its training prompts and decoded ones in its "
                            "held-out prompts (raise --lens-tokens, or 0 for every token)")
    maps = fit_affine(cap.tokens_of("resid", train_mask), ridge)
    held_resid = decoded[:, torch.from_numpy(on_held)]
    per_token = decode_states(model, held_resid, maps)
    owners = decoded_owners[on_held]
    target = to_numpy(held_resid[-1].to(torch.float64))
    target_sum = np.zeros((cap.n_prompts, target.shape[1]))
    np.add.at(target_sum, owners, target)
    parts = np.stack([prompt_sums(to_numpy(per_token[name]), owners, cap.n_prompts) for name in AFFINE_STATISTICS])
    square = prompt_sums((target ** 2).sum(axis=1)[None], owners, cap.n_prompts)[:, 0]
    return AffineLens(ridge=ridge, train_prompts=train, held_prompts=held, prompt_parts=parts, target_sum=target_sum,
                      target_square=square,
                      **affine_fields(parts, target_sum, square, held, lens_parts, tokens, np.ones(cap.n_prompts)))


@dataclass(frozen=True)
class LensParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    lens_position: int = option(-1, "position of the first prompt whose top tokens are shown per state (negative: from its end)")
    lens_top_k: int = option(TOP_K, "tokens shown per state at --lens-position", at_least=1)
    affine_lens: bool = option(False, "also fit an affine map per state to the last state (ridge, closed form) on the "
                                      "even-numbered prompts and report it on the others")
    lens_ridge: float = option(RIDGE, "the affine lens's ridge, relative to the mean eigenvalue of each state's input co-moment",
                               at_least=0)
    lens_tokens: int = option(LENS_TOKENS, "included tokens decoded per run, drawn at random under --seed (0: every token)",
                              at_least=0)


ANALYSIS = Analysis(
    name="lens",
    help="logit lens: every state decoded through the final norm and unembedding (KL to the output, rank, entropy, top tokens)",
    heading="Logit lens",
    order=25,
    streams=STREAMS,
    result=LensResult,
    measure=measure,
    parameters=LensParameters,
    causal="the lens compares each state's decoding with the next-token distribution (minilm-l6's checkpoint has no "
           "masked-LM head)",
)
