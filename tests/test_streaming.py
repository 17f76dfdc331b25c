"""Streaming accumulators: known answers, merge == single run == the direct lensdyn function (to float64
round-off, in any split and order), exact save/load, refused inputs; then smollm2's diverse capture."""
import numpy as np
import pytest
import torch
from jaxtyping import TypeCheckError

from lensdyn import sphere, streaming
from lensdyn.analyses import expansion
from lensdyn.analyses import metastability as ms
from lensdyn.errors import ArgumentError, NonFiniteActivationError
from lensdyn.ops import aggregate_ratio, masked_tokens, token_norms
from lensdyn.streaming import (
    CovarianceStats,
    EnergyStats,
    GainStats,
    HistogramStats,
    NormStats,
    StreamingStats,
    load,
    merge_all,
    save,
)

# float64 round-off: sums over ~10^3-10^4 terms in different orders differ by a few 1e-16 relative.
RTOL = 1e-12


def assert_roundoff(streamed, direct):
    """Element-wise relative agreement to RTOL; elements that are zero by cancellation get RTOL of the largest."""
    streamed, direct = np.asarray(streamed), np.asarray(direct)
    np.testing.assert_allclose(streamed, direct, rtol=RTOL, atol=RTOL * float(np.abs(direct).max()))


def random_splits(n, k, rng):
    """``k`` non-empty batches of a random permutation of ``range(n)``, cut at random places."""
    order = torch.from_numpy(rng.permutation(n))
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
    return list(torch.tensor_split(order, torch.from_numpy(cuts)))


def shard_and_merge(make, feed, pieces, rng):
    """One accumulator per piece, merged as a random binary tree in a random order."""
    shards = [feed(make(), piece) for piece in pieces]
    rng.shuffle(shards)
    while len(shards) > 1:
        i = int(rng.integers(len(shards) - 1))
        shards[i : i + 2] = [shards[i].merge(shards[i + 1])]
    return shards[0]


def planted_tokens(n_layers=6, n_tokens=400, d=16, seed=0, dtype=torch.float32):
    """A cloud with an offset and a per-layer scale: norms far from 0, unequal spreads, mixed signs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tokens, d, generator=g, dtype=torch.float64) + 3.0
    scales = torch.exp(torch.linspace(0.0, 2.5, n_layers, dtype=torch.float64))
    noise = 0.3 * torch.randn(n_layers, n_tokens, d, generator=g, dtype=torch.float64)
    return (scales[:, None, None] * base + noise).to(dtype)


def planted_clouds(n_prompts=7, n_layers=4, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 30, (n_prompts,), generator=g).tolist()
    # A shared direction that grows with the layer: inner products drift from ~0 towards 1.
    shared = torch.randn(d, generator=g)
    return [torch.randn(n_layers, n, d, generator=g) + torch.arange(n_layers)[:, None, None] * shared for n in sizes]


# --- known answers ----------------------------------------------------------------------------


def test_a_cloud_scaled_by_c_l_has_scale_factor_c_l_and_hubble_log_ratios():
    x0 = torch.randn(50, 8, dtype=torch.float64)
    c = torch.tensor([1.0, 1.5, 4.0, 0.5, 7.0], dtype=torch.float64)
    stats = NormStats().update(c[:, None, None] * x0)
    n0 = token_norms(x0).numpy()
    for aggregation in ("ratio_of_means", "mean_of_ratios"):
        assert_roundoff(stats.scale_factor(aggregation), c.numpy())
        assert_roundoff(stats.hubble_rate(aggregation), np.diff(np.log(c.numpy())))
    assert_roundoff(stats.mean_norm, c.numpy() * n0.mean())
    assert_roundoff(stats.std_norm, c.numpy() * n0.std())
    assert_roundoff(stats.min_norm, c.numpy() * n0.min())
    assert_roundoff(stats.max_norm, c.numpy() * n0.max())


def test_gain_of_outputs_planted_as_c_times_the_reference():
    ref = torch.randn(3, 40, 5, dtype=torch.float64)
    c = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    stats = GainStats().update(c[:, None, None] * ref, ref)
    for aggregation in ("ratio_of_means", "mean_of_ratios"):
        assert_roundoff(stats.gain(aggregation), c.numpy())
    assert_roundoff(stats.mean_reference_norm, token_norms(ref).mean(dim=1).numpy())


def test_covariance_of_known_data_equals_torch_and_numpy():
    x = planted_tokens(n_layers=3, n_tokens=60, d=5, dtype=torch.float64)
    stats = CovarianceStats().update(x)
    for l in range(3):
        assert_roundoff(stats.covariance[l], torch.cov(x[l].T).numpy())
        assert_roundoff(stats.covariance[l], np.cov(x[l].numpy(), rowvar=False))
        assert_roundoff(stats.second_moment[l], (x[l].T @ x[l] / 60).numpy())
        assert_roundoff(stats.mean[l], x[l].mean(dim=0).numpy())


def test_histogram_of_orthogonal_unit_vectors_is_all_in_the_bin_holding_zero():
    zero_bin = int(np.histogram([0.0], ms.BINS)[0].argmax())
    basis = torch.eye(6)
    clouds = [torch.stack([basis, 3.0 * basis])[:, :n] for n in (2, 4, 6)]  # 2 layers; scaling keeps <x_i, x_j> = 0
    stats = HistogramStats().update(clouds)
    expected = np.zeros((2, len(ms.BINS) - 1))
    expected[:, zero_bin] = 1.0
    np.testing.assert_array_equal(stats.histogram, expected)
    np.testing.assert_array_equal(stats.pooled_histogram, expected)
    assert int(stats.n_pairs[0]) == 1 + 6 + 15


def test_energy_of_aligned_and_orthogonal_clouds():
    """All aligned: sum_ij exp(beta) = n^2 e^beta; orthonormal: n e^beta + n(n-1)."""
    n, betas = 5, (0.5, 2.0)
    aligned = torch.ones(1, n, n)
    orthogonal = torch.eye(n)[None]
    stats = EnergyStats(betas).update([aligned, orthogonal])
    b = np.array(betas)
    e_aligned = np.exp(b) / (2 * b)
    e_orthogonal = (n * np.exp(b) + n * (n - 1)) / (2 * b * n * n)
    assert_roundoff(stats.mean_energy[:, 0], (e_aligned + e_orthogonal) / 2)


def test_norm_spread_keeps_full_precision_where_a_raw_sum_of_squares_loses_it():
    """Norms 1e4 +- 1: Chan/Welford M2 matches the two-pass std to round-off; sum x^2 - n mean^2 would not."""
    g = torch.Generator().manual_seed(1)
    values = 1e4 + torch.randn(3000, generator=g, dtype=torch.float64)
    x = torch.zeros(2, 3000, 3, dtype=torch.float64)
    x[:, :, 0] = values
    stats = shard_and_merge(NormStats, lambda s, idx: s.update(x[:, idx]), random_splits(3000, 17, np.random.default_rng(0)),
                            np.random.default_rng(1))
    direct = values.std(correction=0).item()
    assert_roundoff(stats.std_norm, [direct, direct])
    naive = np.sqrt(np.sum(values.numpy() ** 2) / 3000 - (np.sum(values.numpy()) / 3000) ** 2)
    assert abs(naive - direct) / direct > 100 * RTOL  # the test above would catch a raw sum of squares


# --- merge == single run == direct ------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 7, 40])
def test_shards_in_any_order_merge_to_the_single_run_and_the_direct_functions(k):
    rng = np.random.default_rng(k)
    x = planted_tokens(seed=k)
    ref = planted_tokens(seed=k + 100)
    pieces = random_splits(x.shape[1], k, rng)
    norms = shard_and_merge(NormStats, lambda s, i: s.update(x[:, i]), pieces, rng)
    gains = shard_and_merge(GainStats, lambda s, i: s.update(x[:, i], ref[:, i]), pieces, rng)
    cov = shard_and_merge(CovarianceStats, lambda s, i: s.update(x[:, i]), pieces, rng)
    single_norms, single_gains, single_cov = NormStats().update(x), GainStats().update(x, ref), CovarianceStats().update(x)

    n = token_norms(x)
    for aggregation in ("ratio_of_means", "mean_of_ratios"):
        a = expansion.scale_factor(n, aggregation)
        for streamed in (norms, single_norms):
            assert_roundoff(streamed.scale_factor(aggregation), a)
            assert_roundoff(streamed.hubble_rate(aggregation), expansion.hubble(a))
        g = aggregate_ratio(n, token_norms(ref), aggregation).numpy()
        assert_roundoff(gains.gain(aggregation), g)
        assert_roundoff(single_gains.gain(aggregation), g)
    for streamed in (norms, single_norms):
        assert_roundoff(streamed.mean_norm, n.mean(dim=1).numpy())
        assert_roundoff(streamed.std_norm, n.std(dim=1, correction=0).numpy())
        np.testing.assert_array_equal(streamed.min_norm, n.amin(dim=1).numpy())  # min and max are exact
        np.testing.assert_array_equal(streamed.max_norm, n.amax(dim=1).numpy())
    x64 = x.to(torch.float64)
    centred = x64 - x64.mean(dim=1, keepdim=True)
    direct_cov = (centred.mT @ centred / (x.shape[1] - 1)).numpy()  # expansion.covariance_shape's normalisation
    for streamed in (cov, single_cov):
        assert_roundoff(streamed.covariance, direct_cov)
        assert_roundoff(streamed.second_moment, (x64.mT @ x64 / x.shape[1]).numpy())
    assert norms.count == gains.count == cov.count == x.shape[1]


def test_merge_is_associative_commutative_has_an_identity_and_leaves_operands_alone():
    x = planted_tokens()
    for make, feed in ((NormStats, lambda s, i: s.update(x[:, i])), (CovarianceStats, lambda s, i: s.update(x[:, i])),
                       (GainStats, lambda s, i: s.update(x[:, i], x.flip(0)[:, i]))):
        a, b, c = (feed(make(), i) for i in random_splits(x.shape[1], 3, np.random.default_rng(3)))
        before = a.to_dict()
        variants = [a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(a).merge(b),
                    make().merge(a).merge(b).merge(c).merge(make())]
        for v in variants[1:]:
            assert v.count == variants[0].count
            for name in make.ARRAYS:
                assert_roundoff(getattr(v, name), getattr(variants[0], name))
        after = a.to_dict()
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])


@pytest.mark.parametrize("k", [2, 7])
def test_cloud_statistics_merge_to_the_single_run_and_to_metastability(k):
    clouds = planted_clouds(n_prompts=11, seed=k)
    rng = np.random.default_rng(k)
    pieces = random_splits(len(clouds), k, rng)
    betas = (0.1, 1.0, 5.0)
    hist = shard_and_merge(HistogramStats, lambda s, i: s.update([clouds[j] for j in i]), pieces, rng)
    energy = shard_and_merge(lambda: EnergyStats(betas), lambda s, i: s.update([clouds[j] for j in i]), pieces, rng)
    single_hist, single_energy = HistogramStats().update(clouds), EnergyStats(betas).update(clouds)

    # What metastability reports: per-prompt cloud metrics, averaged over prompts.
    metrics = [ms.cloud_metrics(c, betas) for c in clouds]
    analysis_hist = np.mean([m.histogram for m in metrics], axis=0)
    analysis_energy = np.mean([m.energy for m in metrics], axis=0)
    pooled_counts = np.stack([
        np.histogram(np.concatenate([sphere.pair_values(g).numpy() for g in grams]), ms.BINS)[0]
        for grams in zip(*(streaming.cloud_grams(c) for c in clouds))
    ])
    for h, e in ((hist, energy), (single_hist, single_energy)):
        assert_roundoff(h.histogram, analysis_hist)
        assert_roundoff(e.mean_energy, analysis_energy)
        np.testing.assert_array_equal(h.pair_counts, pooled_counts)  # integer counts: exact in any order
        assert_roundoff(h.pooled_histogram, pooled_counts / pooled_counts.sum(axis=1, keepdims=True))
        assert h.n_prompts == e.n_prompts == len(clouds)
    # The two aggregations differ when prompts differ in length: the analysis weighs prompts, pooling weighs pairs.
    assert np.abs(hist.histogram - hist.pooled_histogram).max() > 1e-3


def test_bfloat16_batches_equal_the_same_values_in_a_wider_dtype():
    """bfloat16 values are exact in float32/float64: the accumulators see the same numbers, summed in float64."""
    x = planted_tokens(dtype=torch.bfloat16)
    for make, wide in ((NormStats, torch.float32), (CovarianceStats, torch.float64)):
        low, high = make().update(x), make().update(x.to(wide))
        for name in make.ARRAYS:
            assert getattr(low, name).dtype == np.float64
            assert_roundoff(getattr(low, name), getattr(high, name))
    n = token_norms(x)  # and the streamed a(l) is the direct one on the bfloat16 batch itself
    assert_roundoff(NormStats().update(x).scale_factor("mean_of_ratios"), expansion.scale_factor(n, "mean_of_ratios"))


# --- shards on disk ---------------------------------------------------------------------------


def filled_stats():
    x, clouds = planted_tokens(), planted_clouds()
    stats = StreamingStats({
        "norms": (NormStats(), "resid"),
        "cov": (CovarianceStats(), "resid"),
        "gain": (GainStats(), ("out", "resid")),
        "hist": (HistogramStats(), "resid"),
        "energy": (EnergyStats((0.5, 2.0)), "resid"),
        "unused": (NormStats(), "resid_mid"),
    })
    packed = {"resid": x, "out": 2 * x, "resid_mid": x[:, :0]}  # "unused" stays empty: an empty shard round-trips too
    return stats.update_from(packed, {"resid": clouds}), x, clouds


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_and_load_restore_every_bit(tmp_path, suffix):
    stats, _, _ = filled_stats()
    back = load(save(stats, tmp_path / f"shard{suffix}"))
    assert list(back) == list(stats)
    for name in stats:
        original, restored = stats.to_dict()["entries"][name], back.to_dict()["entries"][name]
        assert original.keys() == restored.keys()
        assert original["source"] == restored["source"]
        for key, value in original["stats"].items():
            assert np.asarray(value).dtype == np.asarray(restored["stats"][key]).dtype, key
            np.testing.assert_array_equal(value, restored["stats"][key])
    norms = load(save(stats["norms"], tmp_path / f"norms{suffix}"))
    assert isinstance(norms, NormStats)
    np.testing.assert_array_equal(norms.scale_factor(), stats["norms"].scale_factor())
    assert back["unused"].empty
    np.testing.assert_array_equal(back["energy"].mean_energy, stats["energy"].mean_energy)
    # A loaded shard keeps merging.
    assert back.merge(stats)["hist"].n_prompts == 2 * stats["hist"].n_prompts


def test_container_equals_its_accumulators_run_alone_and_merges_shards():
    stats, x, clouds = filled_stats()
    assert_roundoff(stats["norms"].mean_norm, NormStats().update(x).mean_norm)
    np.testing.assert_array_equal(stats["gain"].gain(), GainStats().update(2 * x, x).gain())
    np.testing.assert_array_equal(stats["hist"].histogram_total, HistogramStats().update(clouds).histogram_total)
    np.testing.assert_array_equal(stats["energy"].energy_total, EnergyStats((0.5, 2.0)).update(clouds).energy_total)
    merged = merge_all([stats, stats, stats])
    assert merged["norms"].count == 3 * x.shape[1]
    assert_roundoff(merged["cov"].covariance, stats["cov"].comoment / (3 * x.shape[1] - 1) * 3)


# --- refused input ----------------------------------------------------------------------------


def test_mismatched_shapes_between_batches_and_shards_are_refused():
    x = planted_tokens(n_layers=4, d=8)
    for make, feed in ((NormStats, lambda s, t: s.update(t)), (CovarianceStats, lambda s, t: s.update(t)),
                       (GainStats, lambda s, t: s.update(t, t))):
        stats = feed(make(), x)
        with pytest.raises(ArgumentError, match="3 layers of d_model 8, but the accumulator holds 4 layers"):
            feed(stats, x[:3])
        with pytest.raises(ArgumentError, match="d_model 5"):
            feed(stats, x[..., :5])
        with pytest.raises(ArgumentError, match="cannot merge"):
            stats.merge(feed(make(), x[:3]))
    clouds = planted_clouds(n_layers=4)
    hist = HistogramStats().update(clouds)
    with pytest.raises(ArgumentError, match="prompt 1 of the batch.*3 layers"):
        hist.update([clouds[0], clouds[1][:3]])
    with pytest.raises(ArgumentError, match="1 tokens; a cloud needs 2"):
        hist.update([clouds[0][:, :1]])
    with pytest.raises(ArgumentError, match="different bins"):
        hist.merge(HistogramStats(np.linspace(-1, 1, 11)))
    with pytest.raises(ArgumentError, match="different betas"):
        EnergyStats((1.0,)).merge(EnergyStats((2.0,)))
    with pytest.raises(ArgumentError, match="cannot merge NormStats into CovarianceStats"):
        CovarianceStats().merge(NormStats())
    # Within one call the suite's jaxtyping check sees the token mismatch first; without it, lensdyn's own check does.
    with pytest.raises((ArgumentError, TypeCheckError), match="same tokens|token"):
        GainStats().update(x[:, :10], x[:, 10:30])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused_and_nothing_is_accumulated(bad):
    x = planted_tokens(n_layers=3, n_tokens=20, d=4)
    poisoned = x.clone()
    poisoned[2, 7, 1] = bad
    for make, feed in ((NormStats, lambda s, t: s.update(t)), (CovarianceStats, lambda s, t: s.update(t)),
                       (GainStats, lambda s, t: s.update(x, t))):
        stats = feed(make(), x)
        before = stats.to_dict()
        with pytest.raises(NonFiniteActivationError, match=r"1 NaN/inf value\(s\) at layer\(s\) \[2\], token\(s\) \[7\]"):
            feed(stats, poisoned)
        for key, value in before.items():
            np.testing.assert_array_equal(value, stats.to_dict()[key])
    clouds = planted_clouds(n_layers=3)
    clouds[3] = clouds[3].clone()
    clouds[3][1, 0, 0] = bad
    with pytest.raises(NonFiniteActivationError, match=r"prompt 3 of the batch.*layer\(s\) \[1\], token\(s\) \[0\]") as err:
        EnergyStats().update(clouds)
    assert err.value.prompt_indices == [3]
    # The container checks every input before any accumulator changes.
    stats, _, good_clouds = filled_stats()
    before = stats["norms"].to_dict()
    with pytest.raises(NonFiniteActivationError):
        stats.update_from({"resid": planted_tokens(), "out": planted_tokens(), "resid_mid": planted_tokens()},
                          {"resid": [*good_clouds[:2], torch.full((4, 3, 12), bad)]})
    np.testing.assert_array_equal(before["total"], stats["norms"].to_dict()["total"])


def test_unknown_aggregation_empty_statistics_and_bad_paths_are_refused(tmp_path):
    with pytest.raises(ArgumentError, match="holds no tokens yet"):
        NormStats().mean_norm
    with pytest.raises(ArgumentError, match="holds no prompts yet"):
        HistogramStats().histogram
    with pytest.raises(ArgumentError, match="aggregation must be"):
        NormStats().update(planted_tokens()).scale_factor("median")
    with pytest.raises(ArgumentError, match="at least 2 tokens"):
        CovarianceStats().update(planted_tokens(n_tokens=1)).covariance
    with pytest.raises(ArgumentError, match=".npz or .json"):
        save(NormStats(), tmp_path / "shard.pt")
    with pytest.raises(ArgumentError, match="reads stream"):
        StreamingStats({"n": (NormStats(), "resid")}).update_from({"attn_out": planted_tokens()})
    with pytest.raises(ArgumentError, match=r"reads \(output, reference\) streams"):
        StreamingStats({"g": (GainStats(), "attn_out")})
    with pytest.raises(ArgumentError, match="cannot merge shards"):
        StreamingStats({"n": (NormStats(), "resid")}).merge(StreamingStats({"m": (NormStats(), "resid")}))


# --- smollm2: a real capture ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_packed(smollm2_diverse):
    """The diverse capture's included tokens, packed, and each prompt's share of them (prompts are contiguous)."""
    cap = smollm2_diverse
    counts = cap.mask.sum(dim=1).tolist()
    packed = {s: masked_tokens(getattr(cap, s), cap.mask) for s in ("resid", "attn_out", "attn_in")}
    return cap, packed, counts


@pytest.mark.slow
def test_smollm2_prompt_batches_in_any_order_match_expansion_and_gains(smollm2_packed):
    cap, packed, counts = smollm2_packed
    resid, attn_out, attn_in = packed["resid"], packed["attn_out"], packed["attn_in"]
    prompt_batches = [(resid_p, out_p, in_p) for resid_p, out_p, in_p in
                      zip(*(torch.split(t, counts, dim=1) for t in (resid, attn_out, attn_in)))]
    rng = np.random.default_rng(0)
    norms = shard_and_merge(NormStats, lambda s, p: s.update(prompt_batches[p][0]), list(range(len(counts))), rng)
    gains = shard_and_merge(GainStats, lambda s, p: s.update(prompt_batches[p][1], prompt_batches[p][2]),
                            list(range(len(counts))), rng)
    n = token_norms(resid)
    for aggregation in ("ratio_of_means", "mean_of_ratios"):
        a = expansion.scale_factor(n, aggregation)
        assert_roundoff(norms.scale_factor(aggregation), a)
        assert_roundoff(norms.hubble_rate(aggregation), expansion.hubble(a))
        direct_gain = aggregate_ratio(token_norms(attn_out), token_norms(attn_in), aggregation).numpy()
        assert_roundoff(gains.gain(aggregation), direct_gain)
    assert_roundoff(norms.mean_norm, n.mean(dim=1).numpy())
    assert_roundoff(norms.std_norm, n.std(dim=1, correction=0).numpy())
    assert norms.count == cap.n_tokens
    assert norms.scale_factor()[-1] > 5  # SmolLM2's residual grows: the comparison above is not of constants


@pytest.mark.slow
def test_smollm2_capture_through_the_container_matches_covariance_and_metastability(smollm2_packed):
    cap, packed, counts = smollm2_packed
    betas = ms.BETAS
    spec = {"cov": (CovarianceStats(), "resid"), "hist": (HistogramStats(), "resid"), "energy": (EnergyStats(betas), "resid")}
    whole = StreamingStats(spec).update_from_capture(cap)
    # Prompt by prompt in reverse order, each prompt its own shard.
    clouds = [cap.resid[:, p, cap.mask[p]] for p in range(cap.n_prompts)]
    shards = [StreamingStats({k: (type(a)() if k != "energy" else EnergyStats(betas), s) for k, (a, s) in spec.items()})
              .update_from({"resid": r}, {"resid": [c]}) for r, c in zip(torch.split(packed["resid"], counts, dim=1), clouds)]
    streamed = merge_all(shards[::-1])

    x = packed["resid"].to(torch.float64)
    centred = x - x.mean(dim=1, keepdim=True)
    direct_cov = (centred.mT @ centred / (x.shape[1] - 1)).numpy()
    metrics = [ms.cloud_metrics(c, betas) for c in clouds]
    for stats in (whole, streamed):
        assert_roundoff(stats["cov"].covariance, direct_cov)
        assert_roundoff(stats["hist"].histogram, np.mean([m.histogram for m in metrics], axis=0))
        assert_roundoff(stats["energy"].mean_energy, np.mean([m.energy for m in metrics], axis=0))
    np.testing.assert_array_equal(whole["hist"].pair_counts, streamed["hist"].pair_counts)


# --- Frequent Directions: the covariance spectrum in ell rows per state ---------------------------------------------


def planted_spectrum(n, d, decay, shift, seed):
    """``n`` rows per state with covariance ``Q diag(lam) Q^T`` (``lam_i = decay^i``, a random rotation ``Q`` per state)
    about a mean of size ``shift``: a spectrum known in advance, and a mean the sketch must handle exactly."""
    gen = torch.Generator().manual_seed(seed)
    lam = decay ** torch.arange(d, dtype=torch.float64)
    states = []
    for _ in range(2):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        z = torch.randn(n, d, generator=gen, dtype=torch.float64)
        states.append(z * lam.sqrt() @ q.T + shift * torch.randn(d, generator=gen, dtype=torch.float64))
    return torch.stack(states)


def assert_frequent_directions_bound(sketch: streaming.FrequentDirectionsStats, exact: CovarianceStats):
    """``0 <= x^T (C - B^T B) x <= shrinkage <= tail_k(C) / (ell - k)`` for every unit x and every k < ell, per state."""
    ell = sketch.ell
    for state in range(exact.n_layers):
        c, b = exact.comoment[state], sketch.sketch[state]
        gap = np.linalg.eigvalsh(c - b.T @ b)  # every x^T (C - B^T B) x over unit x lies in [gap.min, gap.max]
        lam = np.linalg.eigvalsh(c)[::-1]
        roundoff = 1e-10 * lam[0]
        assert gap.min() >= -roundoff and gap.max() <= sketch.shrinkage[state] + roundoff
        tails = np.array([lam[k:].sum() / (ell - k) for k in range(ell)])
        assert sketch.shrinkage[state] <= tails.min() + roundoff, (sketch.shrinkage[state], tails.min())
        assert sketch.shrinkage[state] > 0  # the bound is exercised: rows were shrunk
        # Each eigenvalue, as the class reports it, is at most error_bound below the exact one (Weyl).
        under = np.linalg.eigvalsh(exact.covariance[state])[::-1][:ell] - sketch.eigenvalues[state]
        assert under.min() >= -roundoff / exact.count and under.max() <= sketch.error_bound[state] + roundoff


def test_frequent_directions_obeys_its_bound_on_a_known_spectrum_in_any_batches():
    x = planted_spectrum(n=500, d=24, decay=0.7, shift=5.0, seed=0)
    exact = CovarianceStats().update(x)
    for sizes in ((500,), (7, 93, 400), (250, 250)):  # one batch; uneven batches (rows enter ell at a time)
        sketch = streaming.FrequentDirectionsStats(ell=8)
        for part in torch.split(x, list(sizes), dim=1):
            sketch.update(part)
        assert sketch.count == 500 and sketch.sketch.shape == (2, 8, 24)
        np.testing.assert_allclose(sketch.mean, exact.mean, rtol=1e-12)  # the mean is streamed, not sketched
        assert_frequent_directions_bound(sketch, exact)


def test_merged_sketches_obey_the_bound_for_the_union():
    a = planted_spectrum(n=300, d=20, decay=0.6, shift=0.0, seed=1)
    b = planted_spectrum(n=200, d=20, decay=0.6, shift=0.0, seed=2) + 3.0  # another mean: the correction row counts
    left, right = streaming.FrequentDirectionsStats(ell=6).update(a), streaming.FrequentDirectionsStats(ell=6).update(b)
    merged = left.merge(right)
    union = torch.cat([a, b], dim=1)
    assert merged.count == 500 and left.count == 300  # neither operand changed
    assert_frequent_directions_bound(merged, CovarianceStats().update(union))
    assert_frequent_directions_bound(left, CovarianceStats().update(a))


def test_a_sketch_with_more_rows_than_d_model_is_the_exact_spectrum_and_survives_save(tmp_path):
    x = planted_spectrum(n=60, d=5, decay=0.5, shift=2.0, seed=3)
    sketch = streaming.FrequentDirectionsStats(ell=6).update(x[:, :25]).merge(streaming.FrequentDirectionsStats(ell=6).update(x[:, 25:]))
    exact = np.linalg.eigvalsh(CovarianceStats().update(x).covariance)[:, ::-1]
    assert_roundoff(sketch.eigenvalues[:, :5], exact)
    assert np.all(sketch.error_bound <= 1e-12 * exact[:, 0]) and np.all(sketch.eigenvalues[:, 5] <= 1e-12 * exact[:, 0])
    back = load(save(sketch, tmp_path / "fd.npz"))
    assert back.ell == 6 and np.array_equal(back.sketch, sketch.sketch)
    with pytest.raises(ArgumentError, match="different ell"):
        sketch.merge(streaming.FrequentDirectionsStats(ell=7).update(x))
    with pytest.raises(ArgumentError, match="ell >= 2"):
        streaming.FrequentDirectionsStats(ell=1)


def test_plain_accumulators_merge_by_their_declared_reductions_the_others_by_their_own_rule():
    assert [cls.plain() for cls in (GainStats, HistogramStats, EnergyStats)] == [True] * 3
    assert [cls.plain() for cls in (NormStats, CovarianceStats, streaming.FrequentDirectionsStats)] == [False] * 3
    assert all(op in ("sum", "min", "max") for cls in streaming._KINDS.values() for op in cls.REDUCTIONS.values())


def test_reduce_across_one_rank_is_the_identity(tmp_path):
    """The collective path on a one-process gloo group (two processes: tests/test_corpus.py, under torchrun)."""
    import torch.distributed as dist

    x = planted_spectrum(n=40, d=6, decay=0.8, shift=1.0, seed=4).float()
    stats = StreamingStats({"norms": (NormStats(), "resid"), "gain": (GainStats(), ("resid", "resid")),
                            "fd": (streaming.FrequentDirectionsStats(ell=4), "resid")})
    stats.update_from({"resid": x})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reduced = streaming.reduce_across_ranks(stats)
    finally:
        dist.destroy_process_group()
    for name in stats:
        for array in stats[name].ARRAYS:
            assert np.array_equal(getattr(reduced[name], array), getattr(stats[name], array)), (name, array)
