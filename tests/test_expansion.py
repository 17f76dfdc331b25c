"""Expansion: planted growth, planted permutations, the causal metric by hand, then smollm2 against Hugging Face."""
import numpy as np
import pytest
import torch

import lensdyn as ld
from conftest import synthetic_capture
from lensdyn.analyses import expansion
from lensdyn.errors import ArgumentError
from lensdyn.metric import causal_metric, metric_norms


def planted_norms(rates, n_states=12, scale=None):
    """n_lt = c_t exp(H_t l): every token grows at its own planted rate."""
    rates = torch.as_tensor(rates, dtype=torch.float64)
    scale = torch.ones_like(rates) if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    return scale[None, :] * torch.exp(torch.arange(n_states, dtype=torch.float64)[:, None] * rates[None, :])


def test_planted_exponential_growth_recovers_h0_and_every_per_token_h():
    norms = planted_norms(torch.full((50,), 0.1288, dtype=torch.float64), scale=torch.linspace(0.5, 3.0, 50))
    a = expansion.scale_factor(norms)
    np.testing.assert_allclose(a, np.exp(0.1288 * np.arange(12)), rtol=1e-12)
    np.testing.assert_allclose(expansion.hubble(a), 0.1288, rtol=1e-10)
    for space in ("log", "linear"):
        fit = expansion.fit_h0(a, space)
        assert fit.rate[0] == pytest.approx(0.1288, rel=1e-9)
        assert fit.r2[0] == pytest.approx(1.0)
        np.testing.assert_allclose(expansion.per_token_h(norms, space), 0.1288, rtol=1e-9)
    physical, comoving, reduction = expansion.comoving_cv(norms)
    assert comoving == pytest.approx(0.0, abs=1e-12)
    assert reduction == pytest.approx(1.0)


def test_per_token_rates_and_their_position_correlation_are_recovered():
    rates = torch.linspace(0.05, 0.15, 40, dtype=torch.float64)
    track = expansion.expansion_track(planted_norms(rates), torch.arange(40), "euclidean", n_permutations=5)
    np.testing.assert_allclose(track.per_token_h, rates.numpy(), rtol=1e-9)
    assert track.per_token_h_position_spearman == pytest.approx(1.0)
    assert track.per_token_h_cv == pytest.approx(float(rates.std() / rates.mean()), rel=1e-6)


def test_mean_of_ratios_differs_from_ratio_of_means_when_tokens_grow_unequally():
    norms = torch.tensor([[1.0, 10.0], [4.0, 10.0]], dtype=torch.float64)
    assert expansion.scale_factor(norms)[1] == pytest.approx(14 / 11)
    assert expansion.scale_factor(norms, "mean_of_ratios")[1] == pytest.approx(2.5)


def test_comoving_reduction_of_persistent_tokens_beats_the_permutation_null():
    """Tokens that keep their relative size: the real reduction exceeds every permuted draw."""
    rng = np.random.default_rng(0)
    size = torch.from_numpy(rng.lognormal(sigma=0.8, size=200))
    noise = torch.from_numpy(rng.lognormal(sigma=0.05, size=(15, 200)))
    norms = planted_norms(torch.full((200,), 0.2), n_states=15, scale=size) * noise
    _, _, reduction = expansion.comoving_cv(norms)
    null = expansion.cv_reduction_null(norms, n_permutations=50)
    assert reduction > null.max()


def test_nulls_drawn_together_equal_each_metric_permuted_alone():
    """One draw of permutations for several metrics: each null is the one its own permuted copies give, bit for bit."""
    rng = np.random.default_rng(2)
    norms = [torch.from_numpy(rng.lognormal(size=(6, 40))) for _ in range(3)]
    together = expansion.cv_reduction_nulls(norms, n_permutations=70, seed=3)
    for values, null in zip(norms, together):
        draws, alone = np.random.default_rng(3), []
        for size in (64, 6):  # NULL_BATCH, then the rest
            permuted = draws.permuted(np.broadcast_to(values.numpy(), (size, 6, 40)), axis=2)
            alone.append(expansion._comoving_cvs(torch.from_numpy(permuted), "ratio_of_means")[2].numpy())
        np.testing.assert_array_equal(null, np.concatenate(alone))
    assert expansion.cv_reduction_nulls(norms, n_permutations=0)[0].shape == (0,)


def test_a_planted_per_token_permutation_shows_the_null():
    """Shuffle token identity within each layer and the 'comoving' reduction falls to the null."""
    rng = np.random.default_rng(1)
    size = torch.from_numpy(rng.lognormal(sigma=0.8, size=200))
    persistent = planted_norms(torch.full((200,), 0.2), n_states=15, scale=size)
    shuffled = torch.from_numpy(rng.permuted(persistent.numpy(), axis=1))
    null = expansion.cv_reduction_null(persistent, n_permutations=50)
    assert expansion.comoving_cv(persistent)[2] == pytest.approx(1.0)
    reduction = expansion.comoving_cv(shuffled)[2]
    assert null.min() <= reduction <= null.max()
    assert reduction < 0.99


def test_causal_metric_equals_a_hand_computation():
    torch.manual_seed(0)
    W_U = torch.randn(3, 7, dtype=torch.float64)  # d_model 3, vocab 7
    gamma = W_U.T.numpy()
    cov = np.cov(gamma, rowvar=False, bias=True)  # (1/V) sum (g - mean)(g - mean)^T
    M = np.linalg.inv(cov)
    metric = causal_metric(W_U, ridge=0.0)
    np.testing.assert_allclose(metric.matrix().numpy(), M, rtol=1e-10)
    h = torch.randn(5, 3, dtype=torch.float64)
    expected = np.sqrt(np.einsum("ti,ij,tj->t", h.numpy(), M, h.numpy()))
    np.testing.assert_allclose(metric_norms(h, metric).numpy(), expected, rtol=1e-10)
    assert metric.condition_number == pytest.approx(np.linalg.cond(cov), rel=1e-8)


def test_both_causal_metrics_equal_a_hand_computation():
    """Six unembedding rows in 2-d; Cov(gamma) = (1/V) sum_v (g_v - mean)(g_v - mean)^T by hand.

    lensdyn normalises by 1/V (population covariance over the vocabulary), not 1/(V-1).
    """
    gamma = torch.tensor([[2.0, -1.0], [-2.0, -1.0], [-2.0, 1.0], [2.0, 1.0], [2.0, -1.0], [-2.0, -1.0]])
    # mean (0, -1/3); centred rows (±2, -2/3) x4 and (±2, 4/3) x2:
    # Cov_xx = 6 * 4 / 6 = 4; Cov_yy = (4 * 4/9 + 2 * 16/9) / 6 = (48/9) / 6 = 8/9;
    # Cov_xy = (2*(-2/3) + (-2)(-2/3) + (-2)(4/3) + 2(4/3) + 2(-2/3) + (-2)(-2/3)) / 6 = 0.
    cov = torch.tensor([[4.0, 0.0], [0.0, 8.0 / 9.0]], dtype=torch.float64)
    inverse = causal_metric(gamma.T, ridge=0.0, name="causal_inverse")
    dual = causal_metric(gamma.T, ridge=0.0, name="causal_dual")
    torch.testing.assert_close(dual.matrix(), cov)
    torch.testing.assert_close(inverse.matrix(), torch.linalg.inv(cov))
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    # ||x||^2 under Cov^-1: x^2/4 + 9 y^2/8; under Cov: 4 x^2 + 8 y^2/9.
    hand_inverse = torch.tensor([1 / 4, 9 * 9 / 8, 1 / 4 + 9 / 8], dtype=torch.float64).sqrt()
    hand_dual = torch.tensor([4.0, 8.0, 4 + 8 / 9], dtype=torch.float64).sqrt()
    torch.testing.assert_close(metric_norms(x, inverse), hand_inverse)
    torch.testing.assert_close(metric_norms(x, dual), hand_dual)
    assert inverse.condition_number == dual.condition_number == pytest.approx(4.0 / (8.0 / 9.0))


def test_the_dual_metric_is_the_inverse_of_the_inverse_one_with_the_same_ridge():
    """Park et al.'s pairing: g = Cov l maps the dual norm of l onto the causal norm of g, exactly."""
    torch.manual_seed(2)
    W_U = torch.randn(4, 9, dtype=torch.float64)
    for ridge in (0.0, 1e-3):
        inverse, dual = (causal_metric(W_U, ridge=ridge, name=n) for n in ("causal_inverse", "causal_dual"))
        torch.testing.assert_close(inverse.matrix() @ dual.matrix(), torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(inverse.whitener @ dual.whitener, torch.eye(4, dtype=torch.float64))
        l = torch.randn(6, 4, dtype=torch.float64)
        torch.testing.assert_close(metric_norms(l @ dual.matrix(), inverse), metric_norms(l, dual))
        y = torch.randn(6, 4, dtype=torch.float64)  # <M_dual x, y>_inverse = <x, y>_euclidean
        torch.testing.assert_close(((l @ dual.matrix()) @ inverse.matrix() * y).sum(-1), (l * y).sum(-1))
    assert (inverse.name, dual.name) == ("causal_inverse", "causal_dual")


def test_a_models_two_causal_metrics_share_one_covariance_spectrum(tiny_model):
    from lensdyn.hooks.circuits import model_causal_metric, unembedding

    inverse, dual = (model_causal_metric(tiny_model, name=n) for n in ("causal_inverse", "causal_dual"))
    assert inverse.eigenvalues is dual.eigenvalues  # computed once, cached per model
    torch.testing.assert_close(dual.matrix(), causal_metric(unembedding(tiny_model), name="causal_dual").matrix())


def test_an_unknown_causal_metric_is_an_argument_error():
    with pytest.raises(ArgumentError, match="causal_dual"):
        causal_metric(torch.randn(3, 5), name="causal")


def test_causal_metric_ridge_keeps_a_rank_deficient_unembedding_finite():
    W_U = torch.tensor([[1.0, -1.0, 2.0, -2.0], [0.0, 0.0, 0.0, 0.0]])  # nothing in direction 2
    norms = metric_norms(torch.tensor([[0.0, 1.0]]), causal_metric(W_U))
    assert torch.isfinite(norms).all() and norms.item() > 1e2


def test_redshift_table_and_growth_terms():
    a = np.array([1.0, 2.0, 6.0])
    assert expansion.redshift(a, 0, 2) == pytest.approx(5.0)
    np.testing.assert_allclose(expansion.redshift_table(a)[1], [-0.5, 0.0, 2.0])
    h, d = torch.randn(4, 8), torch.randn(4, 8)
    cross, self_ = expansion.growth_terms(h, d)
    direct = (h + d).double().norm(dim=-1) ** 2 - h.double().norm(dim=-1) ** 2
    torch.testing.assert_close(cross + self_, direct, rtol=1e-5, atol=1e-5)


def test_isotropic_scaling_keeps_covariance_shape_and_grows_every_direction_by_c_squared():
    torch.manual_seed(0)
    x0 = torch.randn(300, 6, dtype=torch.float64) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])
    c = torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64)
    shape = expansion.covariance_shape(c[:, None, None] * x0, k=3)
    np.testing.assert_allclose(shape.subspace_overlap, 1.0, rtol=1e-9)
    np.testing.assert_allclose(shape.eigenvalue_growth, (c**2)[:, None].expand(3, 3).numpy(), rtol=1e-9)
    np.testing.assert_allclose(shape.directional_growth, (c**2)[:, None].expand(3, 3).numpy(), rtol=1e-9)
    lam = np.linalg.eigvalsh(np.cov(x0.numpy(), rowvar=False))
    assert shape.participation_ratio[0] == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    assert list(shape.rank) == [6, 6, 6]


def test_a_rank_k_cloud_has_rank_k_and_a_rotated_one_loses_overlap():
    torch.manual_seed(1)
    low = torch.randn(200, 2, dtype=torch.float64) @ torch.randn(2, 8, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    shape = expansion.covariance_shape(torch.stack([low, low @ rotation]), k=2)
    assert list(shape.rank) == [2, 2]
    assert shape.subspace_overlap[0, 1] < 0.9


def synthetic_stream(n_states=5, n_prompts=2, n_pos=6, d=8, seed=0):
    """A pre-norm stream with known pieces: resid_mid = resid + attn_out, next resid = resid_mid + mlp_out."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = n_states - 1
    attn_out = torch.randn(n_blocks, n_prompts, n_pos, d, generator=g)
    mlp_out = torch.randn(n_blocks, n_prompts, n_pos, d, generator=g)
    resid = [torch.randn(n_prompts, n_pos, d, generator=g)]
    resid_mid = []
    for l in range(n_blocks):
        resid_mid.append(resid[-1] + attn_out[l])
        resid.append(resid_mid[-1] + mlp_out[l])
    resid, resid_mid = torch.stack(resid), torch.stack(resid_mid)
    attn_in = resid[:-1] / resid[:-1].norm(dim=-1, keepdim=True) * 3.0  # an RMS-like norm with gain 3/sqrt(d)
    return dict(resid=resid, resid_mid=resid_mid, attn_in=attn_in, attn_out=attn_out, mlp_in=resid_mid.clone(), mlp_out=mlp_out)


def test_measure_on_a_synthetic_capture_adds_up():
    streams = synthetic_stream()
    cap = synthetic_capture(torch.ones(2, 6, dtype=torch.bool), **streams)
    W_U = torch.randn(8, 20)
    model = torch.nn.Module()
    model.W_U = torch.nn.Parameter(W_U)  # all the causal metric reads
    result = expansion.measure(cap, model=model, control=None, n_permutations=10)
    np.testing.assert_allclose(result.post_ln_norms, 3.0, rtol=1e-5)
    # Sublayer growth terms add up to the growth of the mean squared norm across each block.
    sq = (streams["resid"][:, :, 1:].double() ** 2).sum(-1).mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(result.attn_growth + result.mlp_growth, np.diff(sq), rtol=1e-4)
    for track, name in ((result.causal, "causal_inverse"), (result.causal_dual, "causal_dual")):
        expected = metric_norms(streams["resid"][:, :, 1:].reshape(5, -1, 8), causal_metric(W_U, name=name))
        np.testing.assert_allclose(track.norms, expected.numpy(), rtol=1e-5)
        assert result.track(name) is track and track.metric == name
    assert result.conventions.causal_metrics == ("causal_inverse", "causal_dual")
    assert result.token_position.tolist() == [1, 2, 3, 4, 5] * 2
    assert 0.0 <= result.attn_share <= 1.0


def test_measure_asks_for_the_model_and_refuses_a_control_it_cannot_build(tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (2, 8)), streams=expansion.STREAMS)
    with pytest.raises(ArgumentError, match="needs model="):
        expansion.measure(cap)
    with pytest.raises(ArgumentError, match="ld.load_model"):
        expansion.measure(cap, model=tiny_model)  # a native bridge lensdyn did not load: no random twin
    with pytest.raises(ArgumentError, match="control must be"):
        expansion.measure(cap, model=tiny_model, control="untrained")


def test_result_round_trips_through_json_with_its_control(tmp_path, tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (3, 10)), streams=expansion.STREAMS)
    control = expansion.measure(cap, model=tiny_model, control=None, n_permutations=5)
    result = expansion.measure(cap, model=tiny_model, control=control, n_permutations=5, fit_space="linear")
    loaded = ld.load_result(result.to_json(tmp_path / "expansion.json"))
    assert isinstance(loaded.control, expansion.ExpansionResult)
    assert isinstance(loaded.euclidean.cv_reduction_null, np.ndarray)
    for name in ("norms", "scale_factor", "hubble", "h0", "r2", "per_token_h", "physical_cv", "comoving_cv",
                 "cv_reduction", "cv_reduction_null", "redshift"):
        assert name in result.to_dict()["euclidean"]
    assert "post_ln_norms" in result.to_dict()
    assert "H0" in result.summary()


def test_each_causal_claim_is_judged_under_both_metrics_and_an_older_result_still_loads(tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (3, 10)), streams=expansion.STREAMS)
    result = expansion.measure(cap, model=tiny_model, control=None, n_permutations=5)
    claims = [v.claim for v in result.verdicts()]
    for stem in ("norms grow exponentially", "per-token H uniform", "comoving coordinates remove"):
        named = [c for c in claims if c.startswith(stem)]
        assert len(named) == 2
        assert named[0].endswith(" (Cov(gamma)^-1)") and named[1].endswith(" (Cov(gamma), dual)")
    data = result.to_dict()
    del data["causal_dual"], data["conventions"]["causal_metrics"]  # as a file written before the dual metric
    older = ld.Result.from_dict(data)
    assert older.causal_dual is None and older.conventions.causal_metrics == ()
    dual = [v for v in older.verdicts() if v.claim.endswith("(Cov(gamma), dual)")]
    assert len(dual) == 3 and {v.verdict for v in dual} == {"not testable here"}
    assert "causal_dual" not in older.summary() and "causal_dual" in result.summary()


@pytest.mark.slow
def test_smollm2_has_both_causal_tracks_finite_named_and_round_tripped(smollm2, smollm2_diverse, tmp_path):
    result = expansion.measure(smollm2_diverse, model=smollm2, control=None, n_permutations=5)
    assert result.conventions.causal_metrics == ("causal_inverse", "causal_dual")
    assert [t.metric for t in result.tracks] == ["euclidean", "causal_inverse", "causal_dual"]
    for track in (result.causal, result.causal_dual):
        assert np.isfinite(track.norms).all() and np.isfinite([track.h0, track.r2, track.cv_reduction]).all()
    # Different metrics, different numbers: the dual is not the inverse track relabelled.
    assert not np.allclose(result.causal.scale_factor, result.causal_dual.scale_factor)
    loaded = ld.load_result(result.to_json(tmp_path / "expansion.json"))
    assert loaded == result
    assert loaded.causal_dual.metric == "causal_dual"
    assert loaded.conventions.causal_metrics == ("causal_inverse", "causal_dual")


@pytest.mark.slow
def test_smollm2_scale_factor_matches_raw_hugging_face_states(smollm2, smollm2_diverse, smollm2_reference):
    """Independent path: HF hidden states prompt by prompt, the last block's output taken before the final norm."""
    result = expansion.measure(smollm2_diverse, model=smollm2, control=None, n_permutations=20)
    layers = smollm2_reference.model.layers
    captured = {}
    handle = layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    per_state = [[] for _ in range(len(layers) + 1)]
    try:
        with torch.inference_mode():
            for i in range(smollm2_diverse.n_prompts):
                ids = smollm2_diverse.tokens[i][smollm2_diverse.token_mask[i]][None]
                hidden = smollm2_reference(ids, output_hidden_states=True).hidden_states
                states = list(hidden[: len(layers)]) + [captured["last"]]
                for l, h in enumerate(states):
                    per_state[l].append(h[0, 1:].double().norm(dim=-1))  # position 0 excluded
    finally:
        handle.remove()
    mean = np.array([torch.cat(n).mean().item() for n in per_state])
    np.testing.assert_allclose(result.euclidean.scale_factor, mean / mean[0], rtol=1e-4)
    np.testing.assert_allclose(result.euclidean.mean_norm, mean, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_causal_norms_match_dense_cov_and_inverse_and_post_ln_norms_match_hf(smollm2, smollm2_diverse, smollm2_reference):
    from lensdyn.ops import masked_tokens

    result = expansion.measure(smollm2_diverse, model=smollm2, control=None, n_permutations=5)
    gamma = smollm2_reference.lm_head.weight.detach().double().numpy()
    cov = np.cov(gamma, rowvar=False, bias=True)
    h = masked_tokens(smollm2_diverse.resid, smollm2_diverse.mask)[[0, 15, 30], :40].double().numpy()
    for track, M in ((result.causal, np.linalg.inv(cov)), (result.causal_dual, cov)):
        expected = np.sqrt(np.einsum("lti,ij,ltj->lt", h, M, h))
        np.testing.assert_allclose(track.norms[[0, 15, 30], :40], expected, rtol=1e-4)
    # What block 7 reads: HF's input_layernorm applied to its input.
    block_in = masked_tokens(smollm2_diverse.resid, smollm2_diverse.mask)[7]
    with torch.inference_mode():
        reads = smollm2_reference.model.layers[7].input_layernorm(block_in)
    assert result.post_ln_norms[7] == pytest.approx(reads.double().norm(dim=-1).mean().item(), rel=1e-4)


def test_hubble_epochs_are_found_by_the_change_point_rule():
    """A planted history: inflation (H 0.5 for 2 blocks), slow growth (0.02), re-acceleration (0.2)."""
    rates = np.concatenate([np.full(2, 0.5), np.full(10, 0.02), np.full(8, 0.2)])
    a = np.exp(np.concatenate([[0.0], np.cumsum(rates)]))
    norms = torch.from_numpy(np.outer(a, np.linspace(1.0, 2.0, 30)))
    track = expansion.expansion_track(norms, torch.arange(30), "euclidean", n_permutations=2)
    assert track.hubble_epoch_starts.tolist() == [0, 2, 12]
    np.testing.assert_allclose(track.hubble_epoch_rates, [0.5, 0.02, 0.2], rtol=1e-9)
