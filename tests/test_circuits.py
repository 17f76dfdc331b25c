"""OV circuits and V/OV spectra against brute-force loops and dense eigendecompositions."""
import numpy as np
import pytest
import torch

from conftest import tiny_bridge
from lensdyn.errors import UnsupportedArchitectureError
from lensdyn.hooks.circuits import (
    circuit_spectra,
    layer_ov_circuit,
    ov_circuits,
    value_matrix,
)


def dense_layer_ov(model, layer):
    """sum_h W_V[kv(h)] @ W_O[h], by a plain loop over query heads."""
    attn = model.blocks[layer].attn
    W_V, W_O = attn.W_V.detach().double(), attn.W_O.detach().double()
    group = W_O.shape[0] // W_V.shape[0]
    return sum(W_V[h // group] @ W_O[h] for h in range(W_O.shape[0]))


def sorted_by_modulus(eigenvalues):
    eigenvalues = np.asarray(eigenvalues)
    return eigenvalues[np.lexsort((eigenvalues.imag, eigenvalues.real, -np.abs(eigenvalues).round(9)))]


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
def test_layer_ov_equals_the_sum_over_heads(fixture, request):
    model = request.getfixturevalue(fixture)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(layer_ov_circuit(model, layer).AB.double(), dense_layer_ov(model, layer))


def test_gqa_heads_read_their_shared_kv_head(tiny_gqa_model):
    attn = tiny_gqa_model.blocks[1].attn
    assert attn.W_V.shape[0] == 2 and attn.W_O.shape[0] == 4
    per_head = ov_circuits(tiny_gqa_model, 1).AB
    for h in range(4):
        torch.testing.assert_close(per_head[h], attn.W_V[h // 2] @ attn.W_O[h])


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
def test_spectra_match_dense_eigendecomposition(fixture, request):
    model = request.getfixturevalue(fixture)
    spectra = circuit_spectra(model)
    for layer in range(model.cfg.n_layers):
        dense = np.linalg.eigvals(dense_layer_ov(model, layer).numpy())
        np.testing.assert_allclose(spectra.ov_radius[layer], np.abs(dense).max(), rtol=1e-9)
        # n_heads * d_head == d_model here, so O @ V has every eigenvalue of the OV circuit.
        np.testing.assert_allclose(sorted_by_modulus(spectra.ov_eigenvalues[layer]), sorted_by_modulus(dense), atol=1e-9)
        V = value_matrix(model, layer).double().numpy()
        np.testing.assert_allclose(spectra.v_radius[layer], np.abs(np.linalg.eigvals(V)).max(), rtol=1e-9)
        head_radii = [np.abs(np.linalg.eigvals(m.double().numpy())).max() for m in ov_circuits(model, layer).AB]
        np.testing.assert_allclose(spectra.ov_head_radius[layer], head_radii, rtol=1e-7, atol=1e-12)


def test_complex_fraction_counts_eigenvalues_off_the_real_axis():
    from lensdyn.hooks.circuits import CircuitSpectra

    eig = np.array([[2.0 + 0j, 1 + 1j, 1 - 1j, -0.5 + 0j]])
    spectra = CircuitSpectra(eig, np.abs(eig).max(1), np.ones((1, 2)), None, None)
    np.testing.assert_allclose(spectra.ov_complex_fraction, [0.5])


def test_non_square_value_map_is_an_error_but_ov_still_works():
    model = tiny_bridge(d_head=4)  # 4 heads x 4 = 16 != d_model 32
    with pytest.raises(UnsupportedArchitectureError, match="not square"):
        value_matrix(model, 0)
    spectra = circuit_spectra(model)
    assert spectra.v_radius is None and spectra.ov_eigenvalues.shape == (3, 16)
    dense = np.linalg.eigvals(dense_layer_ov(model, 0).numpy())
    np.testing.assert_allclose(spectra.ov_radius[0], np.abs(dense).max(), rtol=1e-9)


@pytest.mark.slow
def test_smollm2_spectra_against_dense_eigenvalues(smollm2):
    spectra = circuit_spectra(smollm2)
    assert spectra.ov_eigenvalues.shape == (30, 576) and spectra.ov_head_radius.shape == (30, 9)
    for layer in (0, 29):
        ov = dense_layer_ov(smollm2, layer).numpy()
        np.testing.assert_allclose(spectra.ov_radius[layer], np.abs(np.linalg.eigvals(ov)).max(), rtol=1e-8)
        V = value_matrix(smollm2, layer).double().numpy()
        np.testing.assert_allclose(spectra.v_radius[layer], np.abs(np.linalg.eigvals(V)).max(), rtol=1e-8)
    # With 3 KV heads shared by 9 query heads, V repeats each KV block 3 times: rank <= 192.
    assert np.linalg.matrix_rank(value_matrix(smollm2, 0).double().numpy()) <= 192
