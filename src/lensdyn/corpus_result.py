"""``CorpusResult``: the per-state and per-block statistics a corpus run streams, as a ``Result`` beside the analyses' results.

The workflow that fills it (chunks, checkpoints, shard locks, merging shards) is
``lensdyn.app.corpus``; ``lensdyn.app.corpus.corpus_result`` turns merged accumulators
(``lensdyn.streaming``) and their record into one of these. ``state`` indexes ``0..n_layers``,
``block`` the blocks; ``scale_factor`` and the gains are ratios of means over every included
token, ``histogram`` and ``energy`` means over prompts of each prompt's cloud on the sphere
(``lensdyn.sphere``). The covariance's participation ratio and top eigenvalues are NaN at any
state outside ``covariance_states`` (``--covariance-states``), and under a Frequent Directions sketch
(``--covariance-sketch``) the participation ratio is NaN and each eigenvalue is at most
``eigenvalue_error`` below the exact one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from lensdyn.results import Result


@dataclass(frozen=True, eq=False)
class CorpusResult(Result):
    """Streamed per-state and per-block statistics of a corpus. ``state`` indexes ``0..n_layers``, ``block`` the blocks."""

    n_shards: int
    mean_norm: Float[np.ndarray, " state"]
    std_norm: Float[np.ndarray, " state"]
    scale_factor: Float[np.ndarray, " state"]  # ratio of means
    scale_factor_mean_of_ratios: Float[np.ndarray, " state"]
    hubble_rate: Float[np.ndarray, " block"]
    causal_scale_factor: Float[np.ndarray, " state"]
    attn_gain: Float[np.ndarray, " block"]
    mlp_gain: Float[np.ndarray, " block"]
    participation_ratio: Float[np.ndarray, " state"]
    top_eigenvalues: Float[np.ndarray, "state k"]
    histogram: Float[np.ndarray, "state bin"]
    bins: Float[np.ndarray, " edge"]
    energy: Float[np.ndarray, "beta state"]
    betas: Float[np.ndarray, " beta"]
    # The states the covariance covered (participation ratio and top eigenvalues are NaN at the others; a file
    # without the field covered every state), and under --covariance-sketch its rows per state and the largest
    # under-estimate of each eigenvalue (0 where exact).
    covariance_states: Int[np.ndarray, " cstate"] | None = None
    covariance_sketch: int | None = None
    eigenvalue_error: Float[np.ndarray, " state"] | None = None

    def summary(self) -> str:
        p = self.provenance
        lines = [f"Corpus statistics: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, "
                 f"{p.n_tokens} tokens, {self.n_shards} shard(s); {self.conventions.aggregation}",
                 f"{'state':>5} {'mean norm':>11} {'a(l)':>8} {'a_causal':>9} {'PR':>7}"]
        for l in range(len(self.mean_norm)):
            lines.append(f"{l:>5} {self.mean_norm[l]:>11.3f} {self.scale_factor[l]:>8.3f} "
                         f"{self.causal_scale_factor[l]:>9.3f} {self.participation_ratio[l]:>7.2f}")
        return "\n".join(lines)

    def figure(self):
        from plotly.subplots import make_subplots

        states = np.arange(len(self.mean_norm))
        fig = make_subplots(rows=2, cols=2, subplot_titles=(
            "scale factor a(l)", "sublayer gains", "participation ratio of the residual covariance",
            "inner products on the sphere (histogram per state)"))
        fig.add_scatter(x=states, y=self.scale_factor, name="a(l), Euclidean", row=1, col=1)
        fig.add_scatter(x=states, y=self.causal_scale_factor, name="a(l), causal metric", row=1, col=1)
        fig.add_scatter(x=states[:-1], y=self.attn_gain, name="attention gain", row=1, col=2)
        fig.add_scatter(x=states[:-1], y=self.mlp_gain, name="MLP gain", row=1, col=2)
        fig.add_scatter(x=states, y=self.participation_ratio, name="participation ratio", row=2, col=1)
        centres = (self.bins[:-1] + self.bins[1:]) / 2
        fig.add_heatmap(x=centres, y=states, z=self.histogram, colorscale="Viridis", showscale=False, row=2, col=2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_layout(template="plotly_white", height=700,
                          title=f"{self.provenance.model}: {self.provenance.n_prompts} prompts, "
                          f"{self.provenance.n_tokens} tokens")
        return fig
