"""Stability: block Jacobian spectra, attention temperature and mixing time, K-theta alignment, stability index.

The StateLens write-up claims: the block-2 Jacobian spectral radius is ~1.7-1.8 > 1 across 15+
models (its gpt2 value 1.48-1.63), measured on the last token alone as a length-1 sequence;
"stability emerges from LayerNorm"; a mixing time ``tau = tau_min + C / beta`` under attention
temperature ``beta`` (MHA C ~ 27, GQA ~ 4, MQA ~ 0); ``cos theta_k = c0 + c1 (1 - exp(-k / tau))``
for the angle between an MLP's top direction and the top-k PCA subspace of its outputs; and a
stability index with LP / SP / OSC regimes. lensdyn's definitions:

- spectra (``lensdyn.hooks.jacobian``): per block, at the last of the first ``context`` tokens of
  each profiled prompt, in ``"context"`` and ``"single-token"`` mode, with live norms and (context
  mode) frozen norms: leading eigenvalues, spectral radius ``rho``, largest singular value.
- mixing time: for each ``beta`` in ``BETAS`` (attention scores scaled by ``beta``,
  ``lensdyn.hooks.temperature``), ``tau(beta)`` is the first state at which the mean pairwise
  cosine of the sphere-projected tokens (included positions, averaged over prompts) reaches
  ``MIX_LEVEL`` (0.5); NaN if never. Fit ``tau = tau_min + C / beta`` by least squares over the
  betas where it is reached, with ``R^2``.
- K-theta: ``u_l`` is the top right singular vector of block ``l``'s MLP output matrix ``W_out``
  (the direction its linear path writes most); ``cos theta_K = ||P_K u_l||`` with ``P_K`` the
  projector on the top-K principal directions of the block's ``mlp_out`` over tokens. The null:
  ``K``-dimensional random subspaces (``E cos^2 = K / d``), 20 draws. A block beats the null at
  ``K`` when its cosine exceeds the null's 95th percentile. The law is fitted to the mean curve.
- stability index (the write-up gives no formula; lensdyn's reading): ``SI_l = rho_l`` in context
  mode with live norms; regime ``LP`` if ``rho <= 1``, ``SP`` if ``rho > 1`` with a real leading
  eigenvalue, ``OSC`` if ``rho > 1`` with a complex leading pair.

>>> result = stability.measure(ld.load_model("smollm2-135m"), "diverse")      # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy import optimize
from torch import Tensor

from lensdyn import citations
from lensdyn.errors import ArgumentError
from lensdyn.fits import line_fit
from lensdyn.hooks.capture import Capture, capture
from lensdyn.hooks.jacobian import jacobian_spectrum
from lensdyn.hooks.temperature import attention_type, temperature_hooks
from lensdyn.analyses.measure import measure_with_control
from lensdyn.analyses.registry import Analysis, option
from lensdyn.ops import masked_tokens
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.verdicts import Claim, finite

STREAMS = ("resid", "mlp_out")
BETAS = (0.25, 0.5, 1.0, 2.0, 4.0)
MIX_LEVEL = 0.5
K_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# --- pure functions --------------------------------------------------------------------------


def mean_cosine(x: Float[Tensor, "n d_model"]) -> float:
    """Mean of ``<x_i, x_j> / (||x_i|| ||x_j||)`` over pairs ``i != j``.

    >>> mean_cosine(torch.tensor([[1., 0.], [1., 0.], [0., 1.]]))
    0.3333333333333333
    """
    s = torch.nn.functional.normalize(x.to(torch.float64), dim=-1)
    n = s.shape[0]
    total = s.sum(0)
    return float(((total @ total) - n) / (n * (n - 1)))


def mixing_time(cosines: Float[np.ndarray, " state"], level: float = MIX_LEVEL) -> float:
    """First state where the mean cosine reaches ``level`` (NaN if never).

    >>> mixing_time(np.array([0.1, 0.3, 0.6, 0.7]))
    2.0
    """
    reached = np.nonzero(cosines >= level)[0]
    return float(reached[0]) if len(reached) else float("nan")


def fit_inverse_beta(betas: Float[np.ndarray, " beta"], tau: Float[np.ndarray, " beta"]) -> tuple[float, float, float]:
    """``(tau_min, C, R^2)`` of ``tau = tau_min + C / beta`` (OLS in ``1 / beta``) over finite ``tau``.

    >>> [round(v, 6) for v in fit_inverse_beta(np.array([0.5, 1.0, 2.0, 4.0]), 3 + 2 / np.array([0.5, 1.0, 2.0, 4.0]))]
    [3.0, 2.0, 1.0]
    """
    ok = np.isfinite(tau)
    if ok.sum() < 3:
        return float("nan"), float("nan"), float("nan")
    if np.ptp(tau[ok]) == 0:  # a flat tau fits any tau_min with C = 0; R^2 is undefined
        return float(tau[ok][0]), 0.0, float("nan")
    fit = line_fit(1.0 / betas[ok], tau[ok][None, :])
    return float(fit.intercept[0]), float(fit.slope[0]), float(fit.r2[0])


def subspace_cosine(direction: Float[Tensor, " d"], basis: Float[Tensor, "d k"]) -> float:
    """``||Q^T u|| / ||u||`` for an orthonormal basis ``Q``: the cosine of the angle between ``u`` and the subspace.

    >>> subspace_cosine(torch.tensor([1., 1.]), torch.tensor([[1.], [0.]]))
    0.7071067811865475
    """
    u = direction.to(torch.float64)
    return float((basis.to(torch.float64).T @ u).norm() / u.norm())


def k_theta_law(k: Float[np.ndarray, " k"], cos: Float[np.ndarray, " k"]) -> tuple[float, float, float, float]:
    """``(c0, c1, tau, R^2)`` of ``cos theta_k = c0 + c1 (1 - exp(-k / tau))`` by least squares."""
    def law(k, c0, c1, tau):
        return c0 + c1 * (1.0 - np.exp(-k / tau))

    try:
        (c0, c1, tau), _ = optimize.curve_fit(law, k, cos, p0=(cos[0], cos[-1] - cos[0], np.median(k)), maxfev=20000)
    except (RuntimeError, optimize.OptimizeWarning):
        return float("nan"), float("nan"), float("nan"), float("nan")
    residual = cos - law(k, c0, c1, tau)
    tss = ((cos - cos.mean()) ** 2).sum()
    return float(c0), float(c1), float(tau), float(1 - (residual**2).sum() / tss) if tss > 0 else float("nan")


def regime(spectral_radius: float, leading_complex: bool) -> str:
    """``LP`` (rho <= 1), ``SP`` (rho > 1, real leading eigenvalue) or ``OSC`` (rho > 1, complex leading pair)."""
    if spectral_radius <= 1.0:
        return "LP"
    return "OSC" if leading_complex else "SP"


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectrumRecord:
    """One block's spectrum at one position of one prompt."""

    layer: int
    prompt: int
    position: int
    mode: str
    norms: str
    spectral_radius: float
    sigma_max: float
    leading_real: float
    leading_imag: float
    max_residual: float
    matvecs: int
    converged: bool


@dataclass(frozen=True, eq=False)
class StabilityResult(Result):
    """Jacobian profile, temperature sweep, K-theta alignment and stability index of one model."""

    attention_type: str
    spectra: tuple[SpectrumRecord, ...]
    betas: tuple[float, ...]
    mean_cosine: Float[np.ndarray, "beta state"]
    tau: Float[np.ndarray, " beta"]
    tau_min: float
    tau_c: float
    tau_r2: float
    k_grid: tuple[int, ...]
    k_theta: Float[np.ndarray, "block k"]  # cos theta_K per block
    k_theta_null_mean: Float[np.ndarray, " k"]
    k_theta_null_q95: Float[np.ndarray, " k"]
    k_theta_fit: tuple[float, float, float, float]  # c0, c1, tau, R^2 of the mean observed curve
    k_theta_null_fit: tuple[float, float, float, float]
    stability_index: Float[np.ndarray, " profiled"]  # one per profiled block (``layers``)
    regimes: tuple[str, ...]
    control: "StabilityResult | None" = None

    @property
    def layers(self) -> list[int]:
        """The profiled blocks."""
        return sorted({r.layer for r in self.spectra})

    def radius(self, mode: str = "context", norms: str = "live", field: str = "spectral_radius") -> tuple[np.ndarray, np.ndarray]:
        """Per profiled block, mean and std over prompts of ``field`` (``spectral_radius`` or ``sigma_max``)."""
        values = [[getattr(r, field) for r in self.spectra if r.layer == l and r.mode == mode and r.norms == norms]
                  for l in self.layers]
        return np.array([np.mean(v) if v else np.nan for v in values]), np.array([np.std(v) if v else np.nan for v in values])


    def above_null(self, k: int = 8) -> float:
        """Fraction of blocks whose ``cos theta_K`` exceeds the null's 95th percentile at ``K = k``."""
        i = self.k_grid.index(k)
        return float((self.k_theta[:, i] > self.k_theta_null_q95[i]).mean())

    def summary(self) -> str:
        p = self.provenance
        lines = [f"Stability: {p.model} ({p.weights}), {self.attention_type}; prompts {p.prompt_set!r}"]
        header = f"{'block':>5} {'rho ctx':>9} {'rho 1-tok':>10} {'rho frozen':>11} {'sigma ctx':>10} {'regime':>7}"
        lines.append(header + (f" {'ctrl rho ctx':>13}" if self.control else ""))
        ctx, single, frozen = self.radius(), self.radius("single-token"), self.radius("context", "frozen")
        sigma = self.radius(field="sigma_max")[0]
        ctrl = self.control.radius()[0] if self.control else None
        for i, l in enumerate(self.layers):
            line = (f"{l:>5} {ctx[0][i]:>9.4g} {single[0][i]:>10.4g} {frozen[0][i]:>11.4g} {sigma[i]:>10.4g} "
                    f"{self.regimes[i]:>7}")
            lines.append(line + (f" {ctrl[i]:>13.4g}" if ctrl is not None else ""))
        taus = ", ".join(f"{b:g}: {t:g}" for b, t in zip(self.betas, self.tau))
        lines.append(f"temperature: tau(beta) = {{{taus}}} (level {MIX_LEVEL}); fit tau_min {self.tau_min:.2f}, "
                     f"C {self.tau_c:.2f}, R^2 {self.tau_r2:.3f} (write-up: MHA C~27, GQA ~4, MQA ~0)")
        c0, c1, tau, r2 = self.k_theta_fit
        n0, n1, ntau, nr2 = self.k_theta_null_fit
        lines.append(f"K-theta: mean curve fit c0 {c0:.3f}, c1 {c1:.3f}, tau {tau:.1f}, R^2 {r2:.3f}; "
                     f"null curve fit R^2 {nr2:.3f}; blocks above the null's 95% at K=8: {self.above_null(8):.0%}")
        counts = {r: self.regimes.count(r) for r in ("LP", "SP", "OSC")}
        lines.append(f"stability index regimes: {counts}")
        return "\n".join(lines)

    def figure(self):
        """Spectral radius per block (modes, norms, control), tau(beta), and cos theta_K against its null."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=3, subplot_titles=("Jacobian spectral radius per block", "mixing time tau(beta)",
                                                            "K-theta: cos(MLP top direction, top-K PCA)"))
        for r, grey in ((self, False), (self.control, True)):
            if r is None:
                continue
            tag = f"{r.provenance.model} ({r.provenance.weights})"
            colour = "#999" if grey else None
            styles = (("context", "live", "solid"), ("single-token", "live", "dash"), ("context", "frozen", "dot"))
            for mode, norms, dash in styles:
                mean, std = r.radius(mode, norms)
                fig.add_trace(go.Scatter(x=r.layers, y=mean, error_y={"array": std}, mode="lines+markers",
                                         line={"dash": dash, "color": colour}, name=f"{tag}: {mode}, norms {norms}"),
                              row=1, col=1)
            fig.add_trace(go.Scatter(x=r.betas, y=r.tau, mode="markers+lines", name=f"{tag}: tau", line={"color": colour}),
                          row=1, col=2)
        for l in range(self.k_theta.shape[0]):
            fig.add_trace(go.Scatter(x=self.k_grid, y=self.k_theta[l], mode="lines", line={"width": 1}, opacity=0.4,
                                     showlegend=False, hovertext=f"block {l}"), row=1, col=3)
        fig.add_trace(go.Scatter(x=self.k_grid, y=self.k_theta_null_q95, mode="lines",
                                 line={"color": "black", "dash": "dash"}, name="random-subspace null, 95%"), row=1, col=3)
        fig.add_hline(y=1.0, line={"dash": "dash", "color": "black", "width": 1}, row=1, col=1)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_xaxes(type="log", row=1, col=2)
        fig.update_xaxes(type="log", row=1, col=3)
        fig.update_layout(title="Stability", template="plotly_white", height=520)
        return fig


STATELENS = citations.STATELENS.source


def _layer2(r) -> tuple[str, bool | None]:
    if 2 not in r.layers:
        return "block 2 not profiled", None
    rho = float(r.radius("context", "live")[0][r.layers.index(2)])
    return f"rho {rho:.2f}", finite(rho > 1, rho)


def _temperature(r) -> tuple[str, bool | None]:
    if not np.isfinite(r.tau_c):
        return "no temperature sweep", None
    # A flat tau gives an undefined R^2: not testable, never "does not hold".
    return f"C {r.tau_c:.2f}, R^2 {r.tau_r2:.2f} ({r.attention_type})", finite(r.tau_c > 0 and r.tau_r2 >= 0.5, r.tau_r2)


CLAIMS = (
    Claim(STATELENS, "block 2 expands (lambda 1.7-1.8 > 1)", "mean Jacobian spectral radius of block 2 (context, live norms) > 1",
          _layer2, units="spectral radius of the block's Jacobian (dimensionless)"),
    Claim(STATELENS, "K-theta alignment beyond chance", "cos theta_K above the random-subspace null's 95th percentile "
          "at K = 8 in >= half the blocks",
          lambda r: (f"{r.above_null(8):.0%} of blocks", r.above_null(8) >= 0.5) if 8 in r.k_grid else ("K = 8 not run", None)),
    Claim(STATELENS, "attention temperature modulates mixing (C > 0)", "tau = tau_min + C / beta fit with C > 0 and R^2 >= 0.5",
          _temperature, units="C: states x beta (tau counted in states); R^2 dimensionless"),
)
StabilityResult.claims = CLAIMS


def measure(
    capture_or_model,
    prompts="diverse",
    *,
    model=None,
    control="random",
    layers=None,
    profile_prompts: int = 2,
    context: int = 32,
    k: int = 6,
    betas: tuple[float, ...] = BETAS,
    k_grid: tuple[int, ...] = K_GRID,
    seed: int = 0,
    **capture_kwargs,
) -> StabilityResult:
    """Jacobian profile, temperature sweep, K-theta and stability index (module docstring).

    Args:
        layers: blocks to profile (default all).
        profile_prompts: how many prompts the Jacobian profile uses (the first ones).
        context: the Jacobian is taken at the last of each profiled prompt's first ``context`` tokens.
        k: leading eigenvalues per spectrum.
    """
    def measure_one(cap: Capture, model) -> StabilityResult:
        return _measure(cap, model, layers=layers, profile_prompts=profile_prompts, context=context, k=k,
                        betas=tuple(float(b) for b in betas), k_grid=tuple(k_grid), seed=seed)

    return measure_with_control("stability", capture_or_model, prompts, STREAMS, measure_one, model=model,
                                control=control, needs_model="Jacobians and temperature runs use it", **capture_kwargs)


def _measure(cap: Capture, model, layers, profile_prompts, context, k, betas, k_grid, seed) -> StabilityResult:
    cap.require_streams(STREAMS)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    records = []
    for p in range(min(profile_prompts, cap.n_prompts)):
        n = min(int(cap.token_mask[p].sum()), context)
        if n < 2:
            raise ArgumentError(f"prompt {cap.prompts.labels[p]!r} is too short for a Jacobian in context")
        for layer in layers:
            states = cap.resid[layer, p, :n]
            for mode, norms, sigma in (("context", "live", True), ("single-token", "live", False), ("context", "frozen", False)):
                s = jacobian_spectrum(model, states, layer, n - 1, mode, norms, k=k, sigma=sigma, seed=seed)
                lead = s.eigenvalues[0]
                records.append(SpectrumRecord(
                    layer=layer, prompt=p, position=n - 1, mode=mode, norms=norms, spectral_radius=s.spectral_radius,
                    sigma_max=s.sigma_max, leading_real=float(lead.real), leading_imag=float(lead.imag),
                    max_residual=float(s.residuals.max()), matvecs=s.matvecs, converged=s.converged,
                ))
    cosines = np.stack([_mean_cosines(model, cap, beta) for beta in betas])
    tau = np.array([mixing_time(c) for c in cosines])
    tau_min, tau_c, tau_r2 = fit_inverse_beta(np.array(betas), tau)
    k_grid = tuple(kk for kk in k_grid if kk <= min(cap.n_tokens, model.cfg.d_model))
    k_theta, null_mean, null_q95 = _k_theta(model, cap, k_grid, seed)
    grid = np.array(k_grid, dtype=np.float64)
    index, regimes = [], []
    for layer in layers:
        mine = [r for r in records if r.layer == layer and r.mode == "context" and r.norms == "live"]
        rho = float(np.mean([r.spectral_radius for r in mine]))
        complex_lead = np.mean([abs(r.leading_imag) > 1e-6 * r.spectral_radius for r in mine]) > 0.5
        index.append(rho)
        regimes.append(regime(rho, bool(complex_lead)))
    return StabilityResult(
        conventions=Conventions(
            aggregation=f"Jacobians at the last of the first {context} tokens of "
            f"{min(profile_prompts, cap.n_prompts)} prompt(s); mean cosine and K-theta over included tokens",
            excluded_positions=cap.exclude,
            layout=cap.model_info.layout,
        ),
        provenance=Provenance.from_capture(cap),
        attention_type=attention_type(model),
        spectra=tuple(records),
        betas=betas,
        mean_cosine=cosines,
        tau=tau,
        tau_min=tau_min,
        tau_c=tau_c,
        tau_r2=tau_r2,
        k_grid=k_grid,
        k_theta=k_theta,
        k_theta_null_mean=null_mean,
        k_theta_null_q95=null_q95,
        k_theta_fit=k_theta_law(grid, k_theta.mean(axis=0)),
        k_theta_null_fit=k_theta_law(grid, null_mean),
        stability_index=np.array(index),
        regimes=tuple(regimes),
    )


def _mean_cosines(model, cap: Capture, beta: float) -> np.ndarray:
    """Mean pairwise cosine per state under temperature ``beta``, averaged over prompts."""
    # Under "massive", every temperature is measured on the tokens of beta = 1 (the same positions left out).
    hot = cap if beta == 1.0 else capture(model, cap.same_prompts(), streams=("resid",), exclude=cap.exclude,
                                          truncate=bool(cap.truncated), fwd_hooks=temperature_hooks(model, beta),
                                          massive_from=cap if "massive" in cap.exclude else None)
    if hot is not cap and torch.equal(hot.resid, cap.resid):
        from lensdyn.errors import UnsupportedArchitectureError

        # TransformerLens-native bridges fire hook_attn_scores after the fact: scaling it changes nothing.
        raise UnsupportedArchitectureError(
            "this bridge computes attention without routing scores through hook_attn_scores, so a temperature "
            "cannot be applied; pass betas=(1.0,) to skip the sweep"
        )
    per_prompt = [[mean_cosine(hot.resid[l, p][hot.mask[p]]) for l in range(hot.resid.shape[0])]
                  for p in range(hot.n_prompts) if int(hot.mask[p].sum()) >= 2]
    return np.mean(per_prompt, axis=0)


def _k_theta(model, cap: Capture, k_grid: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from lensdyn.errors import UnsupportedArchitectureError

    outputs = masked_tokens(cap.mlp_out, cap.mask).to(torch.float64)  # [block, token, d_model]
    d = outputs.shape[-1]
    rows = []
    for layer in range(outputs.shape[0]):
        try:
            W_out = model.blocks[layer].mlp.W_out.detach().to(torch.float64)  # [d_mlp, d_model]
        except AttributeError as err:
            raise UnsupportedArchitectureError(f"block {layer}'s MLP exposes no W_out: {err}") from err
        top = torch.linalg.svd(W_out, full_matrices=False).Vh[0]
        x = outputs[layer] - outputs[layer].mean(dim=0)
        principal = torch.linalg.svd(x, full_matrices=False).Vh.T  # [d_model, rank]
        rows.append([subspace_cosine(top, principal[:, :kk]) for kk in k_grid])
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(20):
        q, _ = torch.linalg.qr(torch.randn(d, max(k_grid), generator=g, dtype=torch.float64))
        u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
        draws.append([subspace_cosine(u, q[:, :kk]) for kk in k_grid])
    draws = np.array(draws)
    return np.array(rows), draws.mean(axis=0), np.quantile(draws, 0.95, axis=0)


@dataclass(frozen=True)
class StabilityParameters:
    """The options of ``measure()`` (its defaults) as the command line offers them."""

    layers: tuple[int, ...] | None = option(None, "blocks whose Jacobian to profile (default all)", blocks=True)
    profile_prompts: int = option(2, "prompts the Jacobian profile uses", at_least=1)
    context: int = option(32, "Jacobians at the last of each prompt's first CONTEXT tokens", at_least=2)
    betas: tuple[float, ...] = option(BETAS, "attention temperatures", positive=True)


ANALYSIS = Analysis(
    name="stability",
    help="block Jacobian spectra (matrix-free), attention temperature and mixing time, K-theta, stability index",
    heading="Stability",
    order=60,
    streams=STREAMS,
    result=StabilityResult,
    measure=measure,
    parameters=StabilityParameters,
    opt_in=True,  # Jacobian spectra and temperature sweeps run their own forward passes
)
