"""Residual-stream norms per state: the table behind the demo and the raw material of expansion.

For every state ``l = 0..n_layers`` (see the state convention, ``lensdyn.conventions``)
and every token, ``||x_l||_2``; aggregated over the tokens in ``capture.mask`` (position 0
excluded by default) as mean, standard deviation, median and 5/95% quantiles, and per prompt.
Position 0 is reported on its own line so that an attention sink is seen, not averaged in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lensdyn import plots
from lensdyn.analyses.registry import Analysis
from lensdyn.errors import ArgumentError
from lensdyn.hooks.capture import capture_for
from lensdyn.ops import masked_mean, masked_tokens, to_numpy, token_norms
from lensdyn.results import Conventions, Provenance, Result

QUANTILES = (0.05, 0.5, 0.95)
STREAMS = ("resid",)


def residual_norms(resid: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead"]:
    """``||x_l||_2`` of every token at every state, in float64."""
    return token_norms(resid)


def layer_statistics(
    norms: Float[Tensor, "state batch pos"], mask: Bool[Tensor, "batch pos"]
) -> dict[str, Float[np.ndarray, " state"]]:
    """Mean, std (ddof=1), and the ``QUANTILES`` of the masked norms, per state, pooling all tokens.

    >>> n = torch.tensor([[[1., 2., 3.]], [[2., 4., 6.]]])      # 2 states, 1 prompt, 3 positions
    >>> layer_statistics(n, torch.tensor([[False, True, True]]))["mean"]
    array([2.5, 5. ])
    """
    if not bool(mask.any()):
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    tokens = masked_tokens(norms, mask).to(torch.float64)
    q = torch.quantile(tokens, torch.tensor(QUANTILES, dtype=tokens.dtype, device=tokens.device), dim=1)
    std = tokens.std(dim=1) if tokens.shape[1] > 1 else torch.full_like(tokens[:, 0], float("nan"))
    return {
        "mean": to_numpy(tokens.mean(dim=1)),
        "std": to_numpy(std),
        "q05": to_numpy(q[0]),
        "median": to_numpy(q[1]),
        "q95": to_numpy(q[2]),
    }


@dataclass(frozen=True, eq=False)
class NormsResult(Result):
    """Per-state residual norms. Arrays index states ``0..n_layers`` (``n_layers + 1`` of them)."""

    mean: Float[np.ndarray, " state"]
    std: Float[np.ndarray, " state"]
    median: Float[np.ndarray, " state"]
    q05: Float[np.ndarray, " state"]
    q95: Float[np.ndarray, " state"]
    prompt_mean: Float[np.ndarray, "prompt state"]
    first_position_mean: Float[np.ndarray, " state"]
    prompt_labels: tuple[str, ...]

    @property
    def n_layers(self) -> int:
        return len(self.mean) - 1

    def summary(self) -> str:
        p = self.provenance
        lines = [
            f"Residual norms: {p.model} ({p.weights}), prompts {p.prompt_set!r}: "
            f"{p.n_prompts} prompts, {p.n_tokens} tokens; excluded {list(self.conventions.excluded_positions)}",
            f"{'state':>5} {'mean':>10} {'median':>10} {'q05':>10} {'q95':>10} {'pos 0':>10}",
        ]
        for l in range(len(self.mean)):
            lines.append(
                f"{l:>5} {self.mean[l]:>10.3f} {self.median[l]:>10.3f} {self.q05[l]:>10.3f} "
                f"{self.q95[l]:>10.3f} {self.first_position_mean[l]:>10.3f}"
            )
        lines.append(f"growth mean[{self.n_layers}] / mean[0] = {self.mean[-1] / self.mean[0]:.3f}")
        return "\n".join(lines)

    def figure(self, control: "NormsResult | None" = None):
        """Mean norm per state (log scale) with its 5-95% band, per-prompt means, and position 0.

        ``control`` (for example the untrained model) is drawn beside it in grey.
        """
        import plotly.graph_objects as go

        fig = go.Figure()
        for result, colour, name in ((self, plots.MODEL, "trained"), (control, plots.CONTROL, "control")):
            if result is None:
                continue
            label = f"{result.provenance.model} ({result.provenance.weights})"
            states = np.arange(len(result.mean))
            fig.add_trace(go.Scatter(
                x=np.concatenate([states, states[::-1]]),
                y=np.concatenate([result.q95, result.q05[::-1]]),
                fill="toself", fillcolor=colour, opacity=0.15, line={"width": 0},
                name=f"{label}: 5-95% of tokens", hoverinfo="skip", legendgroup=name,
            ))
            for i, prompt in enumerate(result.prompt_labels):
                fig.add_trace(go.Scatter(
                    x=states, y=result.prompt_mean[i], mode="lines", line={"width": 0.7, "color": colour},
                    opacity=0.35, name=f"{label}: {prompt}", legendgroup=name, showlegend=False,
                    hovertemplate=f"{prompt}<br>state %{{x}}: %{{y:.3g}}<extra></extra>",
                ))
            fig.add_trace(go.Scatter(
                x=states, y=result.mean, mode="lines+markers", line={"width": 3, "color": colour},
                name=f"{label}: mean", legendgroup=name,
            ))
            excluded = "first" in result.conventions.excluded_positions
            fig.add_trace(go.Scatter(
                x=states, y=result.first_position_mean, mode="lines", line={"dash": "dot", "color": colour},
                name=f"{label}: position 0{' (excluded)' if excluded else ''}", legendgroup=name,
            ))
        fig.update_layout(
            title="Residual-stream norm per layer",
            xaxis_title="state l (input of block l; last = final block output before the final norm)",
            yaxis_title="||x_l||_2 (raw residual units, log axis)", yaxis_type="log", template="plotly_white", height=520,
            yaxis=plots.log_ticks([r.q05 for r in (self, control) if r is not None]
                                  + [r.q95 for r in (self, control) if r is not None]),
        )
        return fig


def measure(capture_or_model, prompts="diverse", **capture_kwargs) -> NormsResult:
    """Residual norms of a ``Capture``, or of ``prompts`` run through a model.

    >>> result = measure(ld.load_model("smollm2-135m"), "diverse")   # doctest: +SKIP
    >>> print(result.summary())                                      # doctest: +SKIP
    """
    cap, _ = capture_for(capture_or_model, prompts, STREAMS, **capture_kwargs)
    cap.require_streams(STREAMS)
    norms = cap.pad(residual_norms(cap.packed["resid"]))  # [state, batch, pos], zeros at padding
    stats = layer_statistics(norms, cap.mask)
    return NormsResult(
        conventions=Conventions(
            aggregation="mean/std/quantiles over all included tokens pooled; prompt_mean per prompt; "
            "position 0 averaged over prompts separately",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        prompt_mean=to_numpy(masked_mean(norms, cap.mask).T),
        first_position_mean=to_numpy(norms[:, :, 0].mean(dim=1)),
        prompt_labels=cap.prompts.labels,
        **stats,
    )


ANALYSIS = Analysis(
    name="norms",
    help="per-layer residual-stream norms",
    heading="Residual norms",
    order=10,
    cost=0.01,
    streams=STREAMS,
    result=NormsResult,
    measure=measure,
)
