"""Metastability: planted clusters, the idealized dynamics, rotations; then smollm2 against raw Hugging Face states."""
import numpy as np
import pytest
import torch

import lensdyn as ld
from lensdyn.analyses import idealized
from lensdyn.analyses import metastability as ms
from lensdyn.errors import ArgumentError
from lensdyn.hooks.iterate import iterate
from lensdyn.sphere import tie_threshold


def planted_clusters(k=3, per_cluster=30, d=16, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=-1)
    noise = spread * torch.randn(k * per_cluster, d, generator=g, dtype=torch.float64)
    points = centres.repeat_interleave(per_cluster, dim=0) + noise
    return ms.sphere(points)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_planted_clusters_on_the_sphere_are_counted(k):
    x = planted_clusters(k=k)
    n_clusters, noise, labels = ms.clusters(x @ x.T)
    # HDBSCAN never reports a single cluster unless allowed to; one tight blob reads as 0 clusters + noise or 1
    assert n_clusters == k if k > 1 else n_clusters <= 1
    assert noise < 0.1 if k > 1 else True
    if k > 1:
        for c in range(k):  # every planted cluster maps to one label
            assert len(set(labels[c * 30 : (c + 1) * 30].tolist())) == 1


def test_idealized_dynamics_raises_energy_at_every_step_and_clusters():
    states = idealized.simulate(n=64, d=3, beta=4.0, steps=80, dt=0.1, seed=1)
    metrics = ms.cloud_metrics(states, betas=(0.5, 1.0, 4.0), rtol=1e-12)
    assert metrics.energy_violations == ()
    assert np.all(np.diff(metrics.energy, axis=1) >= 0)
    assert metrics.mass_near_one[-1] > 0.3 > metrics.mass_near_one[0]
    assert np.all(np.diff(metrics.mass_near_one) >= -0.01)  # rises, up to one pair crossing back over 0.9
    assert metrics.effective_rank[-1] < metrics.effective_rank[0]


def test_energy_violations_are_found_with_the_pairs_that_drive_them():
    x = planted_clusters(k=2, per_cluster=10, spread=0.01)
    spread = ms.sphere(x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    metrics = ms.cloud_metrics(torch.stack([x, spread]), betas=(1.0,))
    assert len(metrics.energy_violations) == 1
    violation = metrics.energy_violations[0]
    assert violation.block == 0 and violation.relative_drop > 0
    assert all(change < 0 for _, _, change in violation.pairs)


def test_effective_rank_of_isotropic_and_rank_k_clouds():
    g = torch.Generator().manual_seed(0)
    iso = ms.sphere(torch.randn(4000, 8, generator=g, dtype=torch.float64))
    assert ms.effective_rank(iso.T @ iso) == pytest.approx(8.0, rel=0.02)  # the d x d Gram: 8 x 8, not 4000 x 4000
    low = ms.sphere(torch.randn(500, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64))
    assert ms.effective_rank(low @ low.T) <= 3.0 + 1e-9
    assert ms.effective_rank(low.T @ low) == pytest.approx(ms.effective_rank(low @ low.T), rel=1e-12)  # one spectrum


def test_cka_is_one_for_a_copy_and_a_rotated_copy_and_less_for_another_cloud():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 10, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    y = x @ rotation
    assert ms.linear_cka(x @ x.T, x @ x.T) == pytest.approx(1.0)
    assert ms.linear_cka(x @ x.T, y @ y.T) == pytest.approx(1.0)
    z = torch.randn(50, 10, generator=g, dtype=torch.float64)
    assert ms.linear_cka(x @ x.T, z @ z.T) < 0.5


def test_fiedler_of_disconnected_groups_is_zero_and_the_causal_mask_alone_gives_structure():
    blocks = torch.block_diag(torch.full((4, 4), 0.25), torch.full((4, 4), 0.25)).double()
    assert ms.fiedler(blocks) == pytest.approx(0.0, abs=1e-9)
    assert ms.fiedler(ms.mask_only_attention(8, causal=False)) == pytest.approx(1.0)
    assert ms.fiedler(ms.mask_only_attention(8, causal=True)) < 0.9


def test_nearest_neighbour_stability_notices_re_paired_tokens():
    """Pairs (0,1), (2,3) at one state and (0,2), (1,3) at the next: no token keeps its neighbour."""
    def paired(pairs):
        g = torch.eye(4, dtype=torch.float64)
        for i, j in pairs:
            g[i, j] = g[j, i] = 0.9
        return g

    a, b = paired([(0, 1), (2, 3)]), paired([(0, 2), (1, 3)])
    assert ms.nearest_neighbour_stability(a, a) == 1.0
    assert ms.nearest_neighbour_stability(a, b) == 0.0


def test_iterating_a_block_once_reproduces_the_next_state(tiny_model):
    ids = torch.randint(0, 50, (1, 12))
    cap = ld.capture(tiny_model, ids, streams=("resid",), exclude=())
    states = iterate(tiny_model, cap.resid[1, 0], block=1, steps=3)
    assert states.shape == (4, 12, 32)
    torch.testing.assert_close(states[1], cap.resid[2, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ArgumentError, match="block must be"):
        iterate(tiny_model, cap.resid[1, 0], block=7, steps=3)


def test_measure_needs_the_model_and_round_trips(tmp_path, tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (3, 16)), streams=("resid",), attention=True)
    with pytest.raises(ArgumentError, match="needs model="):
        ms.measure(cap)
    result = ms.measure(cap, model=tiny_model, control=None, repeated=False, attention_graphs=True, min_cluster_size=3)
    assert result.fiedler.shape == (3, 4)
    assert result.fiedler_mask_only < 1.0  # the tiny model is causal
    loaded = ld.load_result(result.to_json(tmp_path / "metastability.json"))
    assert isinstance(loaded.prompts[0], ms.CloudMetrics) and isinstance(loaded.prompts[0].timescales, ms.Timescales)
    assert "interaction energy is not monotone" in result.summary()
    assert {v.claim for v in result.verdicts()} >= {"tokens cluster", "collapse speed follows rho(V)"}


@pytest.mark.slow
def test_smollm2_cloud_metrics_match_raw_hugging_face_states(smollm2, smollm2_diverse, smollm2_reference):
    """Independent path for one prompt: HF hidden states, normalised and compared pair by pair in a loop."""
    result = ms.measure(smollm2_diverse, model=smollm2, control=None, repeated=False)
    p = 0
    ids = smollm2_diverse.tokens[p][smollm2_diverse.token_mask[p]][None]
    with torch.inference_mode():
        hidden = smollm2_reference(ids, output_hidden_states=True).hidden_states
    for l in (0, 10, 20):
        x = torch.nn.functional.normalize(hidden[l][0, 1:].double(), dim=-1).numpy()
        n = len(x)
        above = sum(float(x[i] @ x[j]) > 0.9 for i in range(n) for j in range(i + 1, n))
        assert result.prompts[p].mass_near_one[l] == pytest.approx(above / (n * (n - 1) / 2), abs=1e-12)
        energy = np.exp(1.0 * (x @ x.T)).sum() / (2.0 * n * n)
        assert result.prompts[p].energy[1, l] == pytest.approx(energy, rel=1e-6)
    assert result.v_radius is not None and len(result.ov_radius) == 30


@pytest.mark.slow
def test_smollm2_iterate_supplies_rotary_positions(smollm2, smollm2_diverse):
    n = int(smollm2_diverse.token_mask[0].sum())
    states = iterate(smollm2, smollm2_diverse.resid[5, 0, :n], block=5, steps=2)
    torch.testing.assert_close(states[1], smollm2_diverse.resid[6, 0, :n], atol=1e-3, rtol=1e-4)


# --- the clustering's library, its settings, and ties ----------------------------------------


def cosine_distances(x):
    d = np.clip(1.0 - (x @ x.T).numpy(), 0.0, None)
    np.fill_diagonal(d, 0.0)
    return d


def test_cluster_labels_are_a_direct_call_of_the_recorded_library_and_settings_in_either_library():
    """No ties: lensdyn's labels are hdbscan's with hdbscan_settings, which is the call made before the tie rule
    (library defaults), and sklearn's with min_samples one higher (it counts the point itself)."""
    import hdbscan
    from sklearn.cluster import HDBSCAN

    g = torch.Generator().manual_seed(7)
    x = ms.sphere(torch.cat([planted_clusters(k=3, per_cluster=12, spread=0.2, seed=2),
                             torch.randn(8, 16, generator=g, dtype=torch.float64)]))
    assert ms.tied_fraction(ms.tie_representatives(x @ x.T)) == 0.0
    labels = ms.clusters(x @ x.T)[2]
    d = cosine_distances(x)
    np.testing.assert_array_equal(labels, hdbscan.HDBSCAN(**ms.hdbscan_settings()).fit_predict(d))
    np.testing.assert_array_equal(labels, hdbscan.HDBSCAN(metric="precomputed", min_cluster_size=5).fit_predict(d))
    np.testing.assert_array_equal(labels, HDBSCAN(**ms.sklearn_settings(), copy=True).fit_predict(d))
    assert labels.max() >= 1 and (labels < 0).any()  # a cloud with clusters and noise, not a trivial agreement


def test_the_result_records_the_library_its_settings_and_the_tie_rule(tiny_model):
    import importlib.metadata

    cap = ld.capture(tiny_model, torch.randint(0, 50, (2, 16)), streams=("resid",))
    result = ms.measure(cap, model=tiny_model, control=None, repeated=False, min_cluster_size=4, tie_tolerance=1e-3)
    recorded = result.conventions.clustering
    assert f"hdbscan {importlib.metadata.version('hdbscan')}" in recorded
    assert "min_cluster_size=4" in recorded and "min_samples=4)" in recorded
    assert "sklearn.cluster.HDBSCAN min_samples=5" in recorded and "chord distance 0.001" in recorded
    assert result.tie_tolerance == 1e-3 and result.prompts[0].tied_fraction.shape == (result.n_layers + 1,)
    with pytest.raises(ArgumentError, match="tie_tolerance"):
        ms.measure(cap, model=tiny_model, control=None, repeated=False, tie_tolerance=-1.0)


def test_tie_groups_chain_within_the_tolerance_and_stop_beyond_it():
    angles = torch.tensor([0.0, 0.6e-4, 1.2e-4, 1.0, 1.0 + 1.5e-4], dtype=torch.float64)  # chords ~ angle differences
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    np.testing.assert_array_equal(ms.tie_representatives(x @ x.T, 1e-4), [0, 0, 0, 3, 4])  # 0-1-2 chained, 3-4 not
    np.testing.assert_array_equal(ms.tie_representatives(x @ x.T, 0.0), [0, 1, 2, 3, 4])
    assert ms.tied_fraction(ms.tie_representatives(x @ x.T, 1e-4)) == pytest.approx(0.6)
    with pytest.raises(ArgumentError, match="chord distance"):
        ms.tie_representatives(x @ x.T, float("nan"))


def duplicate_clusters(k, copies=8, d=16, seed=0):
    """k orthonormal directions, each repeated ``copies`` times exactly, and one outlier far from all (last)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return torch.cat([q[:k].repeat_interleave(copies, dim=0), -q[:k].sum(0, keepdim=True)]), copies


def assert_same_partition(a, b):
    """Equal up to the numbering of clusters (HDBSCAN's is arbitrary): the same noise, the same pairs together."""
    np.testing.assert_array_equal(a < 0, b < 0)
    np.testing.assert_array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_clusters_of_exact_duplicates_and_an_outlier_give_k_clusters_unchanged_by_jitter(k):
    x, copies = duplicate_clusters(k)
    planted = np.r_[np.repeat(np.arange(k), copies), -1]
    n_clusters, noise, labels = ms.clusters(x @ x.T)
    assert n_clusters == k and noise == pytest.approx(1 / len(x))
    assert_same_partition(labels, planted)
    for seed in range(5):
        jittered = ms.sphere(x + 1e-9 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        assert_same_partition(ms.clusters(jittered @ jittered.T)[2], labels)


def test_one_point_repeated_up_to_rounding_is_one_tie_group_with_no_cluster_count_to_jitter():
    """Every token the same point up to float32-sized rounding, its cosine distances jittered by up to 1e-9:
    one tie group, so 0 clusters (HDBSCAN reports no single cluster) whatever the noise."""
    base = ms.sphere(torch.randn(1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = ms.sphere(base + 1e-7 * torch.randn(60, 64, generator=g, dtype=torch.float64))
        jitter = 1e-9 * torch.rand(60, 60, generator=g, dtype=torch.float64).triu(diagonal=1)
        gram = x @ x.T - jitter - jitter.T
        assert ms.tied_fraction(ms.tie_representatives(gram)) == 1.0
        assert ms.clusters(gram)[:2] == (0, 1.0)


@pytest.mark.slow
def test_smollm2_repeated_tokens_are_one_point_at_every_state_and_their_counts_ignore_jitter(smollm2):
    """A repeated token's causal attention averages identical values, so every state is one point in exact
    arithmetic: float32 rounding must stay within the tie tolerance, and a 1e-9 jitter must not change a count."""
    cap = ld.capture(smollm2, "repeated", streams=("resid",))
    result = ms.measure(cap, model=smollm2, control=None, repeated=False)
    for p, metrics in enumerate(result.prompts):
        np.testing.assert_array_equal(metrics.tied_fraction, 1.0)
        states = cap.tokens_of("resid", prompt=p).double()
        jittered = ms.sphere(states) + 1e-9 * torch.randn(states.shape, generator=torch.Generator().manual_seed(p),
                                                           dtype=torch.float64)
        counts = [ms.clusters(g)[0] for g in ms.cloud_grams(jittered)]
        np.testing.assert_array_equal(counts, metrics.n_clusters)


def all_grams_reference(states, betas, max_cluster_tokens=None):
    """The metrics as measured before the state-by-state loop: every state's Gram at once, the n x n eigenvalues,
    the energy-drop pairs through triu_indices."""
    grams = ms.cloud_grams(states)
    energy = np.array([[ms.interaction_energy(g, b) for g in grams] for b in betas])
    violations = []
    for bi, beta in enumerate(betas):
        for l in range(len(grams) - 1):
            i, j = torch.triu_indices(len(grams[l]), len(grams[l]), offset=1)
            change = torch.exp(beta * grams[l + 1][i, j]) - torch.exp(beta * grams[l][i, j])
            order = torch.topk(change, min(5, change.numel()), largest=False).indices
            violations.append((l, (energy[bi, l] - energy[bi, l + 1]) / energy[bi, l],
                               [(int(i[o]), int(j[o]), float(change[o])) for o in order]))
    return dict(
        grams=grams, energy=energy, violations=violations,
        histogram=np.stack([ms.inner_product_histogram(g) for g in grams]),
        mass=np.array([ms.mass_near_one(g) for g in grams]),
        rank=np.array([ms.effective_rank(g) for g in grams]),
        clusters=[ms.clusters(g)[:2] for g in grams],
        cka=np.array([ms.linear_cka(a, b) for a, b in zip(grams[:-1], grams[1:])]),
        nn=np.array([ms.nearest_neighbour_stability(a, b) for a, b in zip(grams[:-1], grams[1:])]),
    )


def drifting_clusters(n_states=4, d=8, seed=0):
    """Planted clusters on the sphere drifting apart state by state: 60 tokens in 8 dimensions (n > d)."""
    g = torch.Generator().manual_seed(seed)
    x = planted_clusters(k=3, per_cluster=20, d=d, spread=0.1, seed=seed)
    return torch.stack([x + 0.3 * t * torch.randn(x.shape, generator=g, dtype=torch.float64) for t in range(n_states)])


@pytest.mark.parametrize("d", [8, 96])  # n = 60 > d: the d x d Gram's eigenvalues; n <= d: the n x n Gram's
def test_state_by_state_metrics_equal_the_all_grams_reference(d):
    states = drifting_clusters(d=d)
    betas = (0.5, 2.0)
    ref = all_grams_reference(states, betas)
    got = ms.cloud_metrics(states, betas, rtol=-np.inf)  # every block a "violation": every block's pairs compared
    np.testing.assert_array_equal(got.histogram, ref["histogram"])
    np.testing.assert_array_equal(got.mass_near_one, ref["mass"])
    np.testing.assert_array_equal(got.energy, ref["energy"])
    np.testing.assert_allclose(got.effective_rank, ref["rank"], rtol=1e-12)  # one spectrum, two eigensolvers
    assert [(int(c), float(f)) for c, f in zip(got.n_clusters, got.noise_fraction)] == ref["clusters"]
    assert got.clustered_tokens == 60 and got.n_clusters[0] == 3
    if d >= states.shape[1]:
        np.testing.assert_array_equal(got.cka, ref["cka"])
    else:  # n > d: from the d x d cross-covariances (linear_cka_features), the same number to round-off
        np.testing.assert_allclose(got.cka, ref["cka"], rtol=1e-12)
    np.testing.assert_array_equal(got.nn_stability, ref["nn"])
    assert len(got.energy_violations) == len(betas) * (len(states) - 1)
    for v, (block, drop, pairs) in zip(got.energy_violations, ref["violations"]):
        assert (v.block, v.relative_drop) == (block, drop)
        assert [(i, j) for i, j, _ in v.pairs] == [(i, j) for i, j, _ in pairs]
        np.testing.assert_array_equal([c for _, _, c in v.pairs], [c for _, _, c in pairs])


def test_a_cloud_past_max_cluster_tokens_is_clustered_on_one_seeded_subsample_and_nothing_else_changes():
    states = drifting_clusters()
    full = ms.cloud_metrics(states)
    sub = ms.cloud_metrics(states, max_cluster_tokens=30)
    sample = ms.cluster_subsample(60, 30)
    assert ms.cluster_subsample(60, 60) is None and len(sample) == len(set(sample.tolist())) == 30
    np.testing.assert_array_equal(sample, ms.cluster_subsample(60, 30))  # seeded: the same tokens every time
    assert sub.clustered_tokens == 30 and full.clustered_tokens == 60
    expected = [ms.clusters(g[sample][:, sample])[:2] for g in ms.cloud_grams(states)]
    assert [(int(c), float(f)) for c, f in zip(sub.n_clusters, sub.noise_fraction)] == expected
    assert sub.n_clusters[0] == 3  # ~10 tokens of each planted cluster are still three clusters
    for name in ("histogram", "mass_near_one", "effective_rank", "energy", "cka", "nn_stability", "tied_fraction"):
        np.testing.assert_array_equal(getattr(sub, name), getattr(full, name))
    with pytest.raises(ArgumentError, match="at least 2"):
        ms.cluster_subsample(60, 1)


def test_the_result_states_the_cluster_subsample_rule(tiny_model):
    cap = ld.capture(tiny_model, torch.randint(0, 50, (1, 16)), streams=("resid",))
    result = ms.measure(cap, model=tiny_model, control=None, repeated=False)
    assert f"more than {ms.MAX_CLUSTER_TOKENS} tokens" in result.conventions.clustering
    assert "default_rng(0)" in result.conventions.clustering
    assert result.prompts[0].clustered_tokens == int(cap.mask[0].sum())
    assert ms.MetastabilityResult.from_dict(result.to_dict()).prompts[0].clustered_tokens == result.prompts[0].clustered_tokens


@pytest.mark.parametrize("spread", [1.0, 1e-3])  # a spread cloud, and one collapsing onto a point (CKA near 1)
def test_cka_from_features_equals_cka_from_grams(spread):
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(1, 8, generator=g, dtype=torch.float64)
    x = ms.sphere(centre + spread * torch.randn(50, 8, generator=g, dtype=torch.float64))
    y = ms.sphere(x @ torch.randn(8, 8, generator=g, dtype=torch.float64) + spread * torch.randn(50, 8, generator=g,
                                                                                               dtype=torch.float64))
    assert ms.linear_cka_features(x, y) == pytest.approx(ms.linear_cka(x @ x.T, y @ y.T), rel=1e-10)
    assert ms.linear_cka_features(x, x) == pytest.approx(1.0, rel=1e-12)


def test_smallest_pairs_are_the_brute_force_k_smallest_of_the_upper_triangle(monkeypatch):
    g = torch.Generator().manual_seed(4)
    for n, k in ((2, 5), (4, 5), (7, 3), (40, 5), (40, 40)):
        change = torch.randn(n, n, generator=g, dtype=torch.float64)
        brute = sorted((float(change[i, j]), i, j) for i in range(n) for j in range(i + 1, n))[:k]
        indices = ms.upper_pair_indices(n)
        got = ms.smallest_pairs(change.reshape(-1)[indices], indices, n, k)
        assert [(i, j, c) for c, i, j in brute] == got
        monkeypatch.setattr(ms, "PAIR_CHUNK", 7)  # chunks of 7 pairs, the last one padded
        assert ms.smallest_pairs(change.reshape(-1)[indices], indices, n, k) == got
        monkeypatch.undo()


@pytest.mark.parametrize("tolerance", [0.0, 1e-4, 3e-3, 0.7, 1.0, 1.2])  # below sqrt(2): orthogonal points never tie
def test_the_tie_threshold_decides_every_gram_entry_as_the_chord_rule_does(tolerance):
    limit = tolerance * tolerance
    c = tie_threshold(tolerance)
    g = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    if c is not None:  # the floats at and around the threshold, where rounding could decide
        near = [c]
        for _ in range(3):
            near = [np.nextafter(near[0], -np.inf), *near, np.nextafter(near[-1], np.inf)]
        g = torch.cat([g, torch.tensor(near + [1.0, np.nextafter(1.0, 2.0)], dtype=torch.float64)])
        assert torch.equal(g >= c, (2.0 - 2.0 * g) <= limit)
    else:
        assert limit >= 1.0
    square = torch.eye(len(g) + 1, dtype=torch.float64)  # point 0 against every value of g, the rest orthogonal
    square[0, 1:] = square[1:, 0] = g
    tied_to_first = ms.tie_representatives(square, tolerance)[1:] == 0
    assert tied_to_first.tolist() == ((2.0 - 2.0 * g) <= limit).tolist()


def test_a_gram_by_row_blocks_equals_the_one_product_gram_and_reuses_its_buffer(monkeypatch):
    from lensdyn import sphere

    x = ms.sphere(torch.randn(50, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    assert torch.equal(sphere.sphere_gram(x), x @ x.T)  # below 2 GRAM_BLOCK_ROWS: the one product, bit for bit
    monkeypatch.setattr(sphere, "GRAM_BLOCK_ROWS", 8)  # 6 blocks of 8 or 9 rows
    buffer = torch.full((50, 50), torch.nan, dtype=torch.float64)
    blocked = sphere.sphere_gram(x, out=buffer)
    assert blocked is buffer and not bool(blocked.isnan().any())
    torch.testing.assert_close(blocked, x @ x.T, rtol=0, atol=1e-15)
    edges = [50 * b // 6 for b in range(7)]
    for start, stop in zip(edges[:-1], edges[1:]):  # each block below the diagonal blocks mirrors one above
        assert torch.equal(blocked[stop:, start:stop], blocked[start:stop, stop:].T)


def test_cloud_metrics_on_blocked_grams_equal_those_on_one_product_grams(monkeypatch):
    from lensdyn import sphere

    states = drifting_clusters()
    one_product = ms.cloud_metrics(states, rtol=-np.inf)
    monkeypatch.setattr(sphere, "GRAM_BLOCK_ROWS", 16)  # 60 tokens: 3 blocks
    blocked = ms.cloud_metrics(states, rtol=-np.inf)
    for name in ("histogram", "mass_near_one", "n_clusters", "noise_fraction", "tied_fraction", "nn_stability"):
        np.testing.assert_array_equal(getattr(blocked, name), getattr(one_product, name))
    for name in ("energy", "cka", "effective_rank"):
        np.testing.assert_allclose(getattr(blocked, name), getattr(one_product, name), rtol=1e-13)
    assert [(v.block, [p[:2] for p in v.pairs]) for v in blocked.energy_violations] == \
        [(v.block, [p[:2] for p in v.pairs]) for v in one_product.energy_violations]


def test_cka_of_centred_features_reused_across_states_equals_linear_cka_features():
    g = torch.Generator().manual_seed(6)
    x, y = (torch.randn(30, 5, generator=g, dtype=torch.float64) for _ in range(2))
    assert ms.cka_of_centred(ms.centred_features(x), ms.centred_features(y)) == ms.linear_cka_features(x, y)
