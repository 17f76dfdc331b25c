"""Stability: linear maps with known spectra, Arnoldi on a jvp against dense eigenvalues, the all-ones trap."""
import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator

import lensdyn as ld
from conftest import tiny_bridge
from lensdyn.analyses import stability
from lensdyn.errors import ArgumentError
from lensdyn.hooks.jacobian import (
    block_map,
    dense_jacobian,
    jacobian_operator,
    jacobian_spectrum,
)
from lensdyn.fastpath import fast_paths
from lensdyn.hooks import jacobian
from lensdyn.hooks.temperature import attention_type, temperature_hooks
from lensdyn.spectra import largest_singular_value, leading_eigenvalues


def operator(A: np.ndarray) -> LinearOperator:
    return LinearOperator(A.shape, matvec=lambda v: A @ v, rmatvec=lambda v: A.T @ v, dtype=np.float64)


def by_modulus(values: np.ndarray) -> np.ndarray:
    return values[np.lexsort((values.imag, -np.abs(values)))]


def random_with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    """A dense matrix similar to a block-diagonal one with the given eigenvalues (pairs as 2x2 rotations)."""
    rng = np.random.default_rng(seed)
    blocks, i = [], 0
    while i < len(eigenvalues):
        lam = eigenvalues[i]
        if abs(lam.imag) > 0:
            blocks.append(np.array([[lam.real, -lam.imag], [lam.imag, lam.real]]))
            i += 2
        else:
            blocks.append(np.array([[lam.real]]))
            i += 1
    D = np.zeros((len(eigenvalues), len(eigenvalues)))
    k = 0
    for b in blocks:
        D[k : k + len(b), k : k + len(b)] = b
        k += len(b)
    S = rng.standard_normal(D.shape) + 3 * np.eye(len(D))
    return S @ D @ np.linalg.inv(S)


def test_a_real_leading_eigenvalue_is_found():
    values = np.array([2.5, -1.7, 1.2, 0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01] + [0.0] * 20, dtype=complex)
    found, residuals, converged = leading_eigenvalues(operator(random_with_spectrum(values)), k=4)
    np.testing.assert_allclose(found, [2.5, -1.7, 1.2, 0.9], atol=1e-7)
    assert converged and residuals.max() < 1e-6


def test_a_complex_conjugate_leading_pair_is_found_where_power_iteration_fails():
    pair = 1.8 * np.exp(1j * 0.7)
    values = np.array([pair, pair.conjugate(), 1.1, 0.8] + [0.1] * 26)
    A = random_with_spectrum(values, seed=1)
    found, _, converged = leading_eigenvalues(operator(A), k=3)
    np.testing.assert_allclose(by_modulus(found[:2]), by_modulus(np.array([pair, pair.conjugate()])), atol=1e-7)
    # Power iteration's normalised iterate keeps rotating in the pair's plane: it never converges.
    v = np.random.default_rng(0).standard_normal(30)
    moves = []
    for _ in range(200):
        w = A @ v
        w /= np.linalg.norm(w)
        moves.append(min(np.linalg.norm(w - v), np.linalg.norm(w + v)))
        v = w
    assert min(moves[-20:]) > 0.1


def test_a_non_normal_map_has_spectral_radius_below_its_largest_singular_value():
    A = np.array([[0.9, 5.0, 0.0], [0.0, 0.8, 5.0], [0.0, 0.0, 0.7]])
    found, _, _ = leading_eigenvalues(operator(np.pad(A, ((0, 3), (0, 3)))), k=3)
    assert np.abs(found).max() == pytest.approx(0.9, abs=1e-6)
    sigma, _, converged = largest_singular_value(operator(A), tol=1e-12, iterations=1000)
    assert converged and sigma == pytest.approx(np.linalg.norm(A, 2), rel=1e-6)


@pytest.mark.parametrize("mode", ["context", "single-token"])
def test_arnoldi_on_a_jvp_equals_dense_eigenvalues_on_a_tiny_model(mode):
    model = tiny_bridge().double()
    cap = ld.capture(model, torch.randint(0, 50, (1, 10)), streams=("resid",), exclude=())
    states = cap.resid[1, 0].double()
    f, z0 = block_map(model, 1, states, -1, mode)
    dense = np.linalg.eigvals(dense_jacobian(f, z0).numpy())
    spectrum = jacobian_spectrum(model, states, 1, -1, mode, k=6)
    # Six moduli match; a conjugate pair cut in half at the sixth place may show either member.
    np.testing.assert_allclose(np.sort(np.abs(spectrum.eigenvalues)), np.sort(np.abs(by_modulus(dense)[:6])), atol=1e-6)
    np.testing.assert_allclose(by_modulus(spectrum.eigenvalues)[:4], by_modulus(dense)[:4], atol=1e-6)
    assert spectrum.sigma_max == pytest.approx(np.linalg.norm(dense_jacobian(f, z0).numpy(), 2), rel=1e-5)


def test_the_all_ones_vector_is_an_exact_eigenvector_of_a_pre_norm_block_and_does_not_fool_arnoldi():
    model = tiny_bridge().double()  # LayerNorm centres: a constant shift of the input never reaches the sublayers
    cap = ld.capture(model, torch.randint(0, 50, (1, 10)), streams=("resid",), exclude=())
    f, z0 = block_map(model, 2, cap.resid[2, 0].double(), -1, "context")
    op = jacobian_operator(f, z0)
    ones = np.ones(z0.shape[0])
    np.testing.assert_allclose(op.matvec(ones), ones, atol=1e-12)
    dense = np.linalg.eigvals(dense_jacobian(f, z0).numpy())
    found, _, _ = leading_eigenvalues(op, k=4)
    np.testing.assert_allclose(np.abs(found).max(), np.abs(dense).max(), rtol=1e-8)
    assert np.abs(dense).max() > 1.0 + 1e-3, "the trap only matters when 1 is not the leading eigenvalue"


def test_frozen_norms_change_the_jacobian_and_bad_options_fail(tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (1, 8)), streams=("resid",), exclude=())
    states = cap.resid[1, 0]
    live, z0 = block_map(tiny_model, 1, states, -1, "context", "live")
    frozen, _ = block_map(tiny_model, 1, states, -1, "context", "frozen")
    torch.testing.assert_close(live(z0), frozen(z0))  # same value at the base point ...
    assert not torch.allclose(dense_jacobian(live, z0), dense_jacobian(frozen, z0), atol=1e-4)  # ... other slope
    with pytest.raises(ArgumentError, match="mode must be"):
        block_map(tiny_model, 1, states, -1, "sequence")
    with pytest.raises(ArgumentError, match="layer must be"):
        block_map(tiny_model, 9, states, -1)


def test_temperature_is_refused_where_the_bridge_ignores_score_hooks(tiny_model):
    """A TransformerLens-native bridge fires hook_attn_scores after computing attention: say so, do not fake a sweep."""
    from lensdyn.errors import UnsupportedArchitectureError

    cap = ld.capture(tiny_model, torch.randint(0, 50, (2, 8)), streams=("resid",))
    with pytest.raises(UnsupportedArchitectureError, match="hook_attn_scores"):
        stability._mean_cosines(tiny_model, cap, 4.0)
    with pytest.raises(ArgumentError, match="beta must be positive"):
        temperature_hooks(tiny_model, 0.0)
    assert attention_type(tiny_model) == "MHA"
    assert attention_type(tiny_bridge(n_key_value_heads=2, positional_embedding_type="rotary")) == "GQA"


@pytest.mark.slow
def test_temperature_sharpens_smollm2_attention_and_keeps_it_normalised(smollm2):
    ids = torch.tensor([[504, 3045, 8326, 1686, 28, 260, 2378]])
    base = ld.capture(smollm2, ids, streams=("resid",), attention=True)
    hot = ld.capture(smollm2, ids, streams=("resid",), attention=True, fwd_hooks=temperature_hooks(smollm2, 50.0))
    assert hot.attention[3].amax(-1).mean() > base.attention[3].amax(-1).mean() + 0.1
    torch.testing.assert_close(hot.attention.sum(-1), torch.ones_like(hot.attention.sum(-1)))
    assert attention_type(smollm2) == "GQA"


def test_tau_fit_and_k_theta_law_recover_planted_values():
    betas = np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    tau_min, c, r2 = stability.fit_inverse_beta(betas, 2.0 + 27.0 / betas)
    assert (tau_min, c, r2) == (pytest.approx(2.0), pytest.approx(27.0), pytest.approx(1.0))
    assert np.isnan(stability.fit_inverse_beta(betas, np.full(5, 2.0))[2])  # flat tau: R^2 undefined
    k = np.array(stability.K_GRID, dtype=float)
    c0, c1, tau, r2 = stability.k_theta_law(k, 0.2 + 0.7 * (1 - np.exp(-k / 20.0)))
    assert (c0, c1, tau, r2) == (pytest.approx(0.2, abs=1e-6), pytest.approx(0.7, abs=1e-6), pytest.approx(20.0, rel=1e-5),
                                 pytest.approx(1.0))
    assert stability.regime(0.9, True) == "LP" and stability.regime(1.5, False) == "SP" and stability.regime(1.5, True) == "OSC"


def test_measure_on_a_tiny_model_round_trips(tmp_path):
    model = tiny_bridge()
    cap = ld.capture(model, torch.randint(0, 50, (3, 12)), streams=stability.STREAMS)
    result = stability.measure(cap, model=model, control=None, layers=[0, 2], context=8, k=3, k_grid=(1, 2, 4, 8),
                               betas=(1.0,))
    assert result.layers == [0, 2] and len(result.stability_index) == 2
    assert {r.mode for r in result.spectra} == {"context", "single-token"}
    assert result.k_theta.shape == (3, 4) and result.mean_cosine.shape == (1, 4)
    loaded = ld.load_result(result.to_json(tmp_path / "stability.json"))
    assert isinstance(loaded.spectra[0], stability.SpectrumRecord)
    assert "stability index" in result.summary()


@pytest.mark.slow
def test_smollm2_prefix_cache_path_equals_the_full_context_block(smollm2, smollm2_diverse):
    """The fast path (context keys/values precomputed) against the whole context through the bridge block."""
    n = int(smollm2_diverse.token_mask[2].sum())
    states = smollm2_diverse.resid[2, 2, :n]
    fast, z0 = block_map(smollm2, 2, states, -1, "context")
    slow, _ = block_map(smollm2, 2, states, -1, "context", prefix_cache=False)
    assert fast.__name__ == "g" and slow.__name__ == "f"  # the prefix-cache map and the whole-context map
    assert fast_paths(smollm2)[jacobian.PREFIX_CACHE].taken  # a silent fallback would be a speed bug
    v = torch.randn(576, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        (_, a), (_, b) = torch.func.jvp(fast, (z0,), (v,)), torch.func.jvp(slow, (z0,), (v,))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_spectra_of_two_models_measured_side_by_side_in_threads_equal_serial_ones():
    """Forward-mode AD levels are process-wide: without a lock, two threads' jvps collide
    ("Nested forward mode AD is not supported"), as the report's model and control did."""
    import threading

    models = [tiny_bridge(seed=s, d_model=64, d_head=16) for s in (0, 1)]
    states = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    serial = [jacobian_spectrum(m, states, layer=1, k=4).spectral_radius for m in models]
    for _ in range(3):
        found, errors = {}, []

        def work(i):
            try:
                found[i] = [jacobian_spectrum(models[i], states, layer=1, k=4).spectral_radius for _ in range(2)]
            except Exception as err:  # noqa: BLE001 - collected and reported below
                errors.append(repr(err))

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []
        assert all(found[i] == pytest.approx([serial[i]] * 2, rel=1e-6) for i in (0, 1))
