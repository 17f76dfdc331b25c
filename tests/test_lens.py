"""The lens: the regression accumulator against numpy, a planted affine map, a brute-force loop on a tiny
model, the last state against the forward pass, the bootstrap's sums; then smollm2-135m."""
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from jaxtyping import TypeCheckError

import lensdyn as ld
from lensdyn.prompts import PromptSet
from lensdyn.analyses import lens
from lensdyn.errors import ArgumentError
from lensdyn.hooks.patching import final_logits
from lensdyn.ops import Scratch, prompt_index
from lensdyn.streaming import Accumulator, RegressionStats, StreamingStats, merge_all


def toy_regression(n_states=3, n_tokens=60, d=5, seed=0):
    """Inputs with an offset and unequal scales, targets an affine function of them plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_states, n_tokens, d, generator=g, dtype=torch.float64) * torch.arange(1, d + 1) + 4.0
    y = x @ torch.randn(n_states, d, d, generator=g, dtype=torch.float64) + 2.0
    return x, y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)


def test_ridge_zero_is_least_squares_and_a_ridge_is_the_augmented_least_squares():
    x, y = toy_regression()
    stats = RegressionStats().update(x, y)
    for ridge in (0.0, 0.5):
        weight, bias = stats.ridge(ridge)
        for l in range(x.shape[0]):
            xc, yc = (x[l] - x[l].mean(0)).numpy(), (y[l] - y[l].mean(0)).numpy()
            lam = ridge * np.trace(xc.T @ xc) / x.shape[2]
            # The ridge solution is the least-squares one of the centred data stacked on sqrt(lam) I (the bias unpenalised).
            rows, targets = np.vstack([xc, np.sqrt(lam) * np.eye(x.shape[2])]), np.vstack([yc, np.zeros((x.shape[2],) * 2)])
            expected = np.linalg.lstsq(rows, targets, rcond=None)[0]
            np.testing.assert_allclose(weight[l], expected, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(bias[l], (y[l].mean(0) - x[l].mean(0) @ torch.from_numpy(expected)).numpy(), rtol=1e-10)
        if ridge == 0.0:  # and with an intercept column, numpy's own affine least squares
            design = np.hstack([x[0].numpy(), np.ones((x.shape[1], 1))])
            solution = np.linalg.lstsq(design, y[0].numpy(), rcond=None)[0]
            np.testing.assert_allclose(weight[0], solution[:-1], rtol=1e-10)
            np.testing.assert_allclose(bias[0], solution[-1], rtol=1e-10)


def test_regression_shards_merge_to_the_single_run_and_round_trip():
    x, y = toy_regression(n_tokens=90)
    single = RegressionStats().update(x, y)
    cuts = [0, 7, 8, 40, 90]
    shards = [RegressionStats().update(x[:, a:b], y[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    for merged in (merge_all(shards), merge_all(shards[::-1]), shards[0].merge(RegressionStats())):
        if merged.count != single.count:  # the empty accumulator is the identity
            assert merged.count == 7
            continue
        for name in RegressionStats.ARRAYS:
            np.testing.assert_allclose(getattr(merged, name), getattr(single, name), rtol=1e-12, atol=1e-10)
    again = Accumulator.from_dict(single.to_dict())
    assert all(np.array_equal(getattr(again, n), getattr(single, n)) for n in RegressionStats.ARRAYS)
    pair = StreamingStats({"fit": (RegressionStats(), ("x", "y"))}).update_from({"x": x, "y": y})
    np.testing.assert_allclose(pair["fit"].ridge(0.1)[0], single.ridge(0.1)[0], rtol=1e-12)


def test_regression_refuses_mismatched_and_singular_inputs():
    x, y = toy_regression(n_tokens=3)  # 3 tokens for d_model 5: the co-moment is singular
    with pytest.raises((ArgumentError, TypeCheckError)):  # the suite's jaxtyping check comes first
        RegressionStats().update(x, y[:, :2])
    with pytest.raises(ArgumentError, match="singular"):
        RegressionStats().update(x, y).ridge(0.0)
    with pytest.raises(ArgumentError, match="ridge"):
        RegressionStats().update(x, y).ridge(-1.0)
    RegressionStats().update(x, y).ridge(1e-3)  # a ridge makes it solvable


def test_fit_affine_recovers_a_planted_map_exactly():
    """The last state is an exact affine function of every state: ridge 0 returns that map."""
    g = torch.Generator().manual_seed(1)
    n_states, n, d = 4, 80, 6
    maps = torch.randn(n_states, d, d, generator=g, dtype=torch.float64)
    offsets = torch.randn(n_states, d, generator=g, dtype=torch.float64)
    last = torch.randn(n, d, generator=g, dtype=torch.float64) + 3.0
    # state l = (last - c_l) A_l^-1, so last = state_l A_l + c_l; the last state's own map is the identity.
    maps[-1], offsets[-1] = torch.eye(d, dtype=torch.float64), 0.0
    resid = torch.stack([(last - offsets[l]) @ torch.linalg.inv(maps[l]) for l in range(n_states)])
    weight, bias = lens.fit_affine(resid, ridge=0.0, chunk=17)
    torch.testing.assert_close(weight, maps, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(bias, offsets, rtol=1e-8, atol=1e-8)


def tiny_capture(model, n_prompts=6, length=10, seed=0):
    ids = torch.randint(0, model.cfg.d_vocab, (n_prompts, length), generator=torch.Generator().manual_seed(seed))
    return ld.capture(model, ids, streams=lens.STREAMS)


def test_lens_equals_a_brute_force_loop_on_a_tiny_model(tiny_model):
    """Every token and state decoded one at a time, KL / entropy / rank by scipy and numpy in float64."""
    cap = tiny_capture(tiny_model)
    result = lens.measure(cap, model=tiny_model, control=None, lens_top_k=3)
    resid, owners = cap.tokens_of("resid"), prompt_index(cap.mask).numpy()
    sums = np.zeros((len(lens.STATISTICS), cap.n_prompts, cap.n_layers + 1))
    for t in range(resid.shape[1]):
        q = scipy.special.softmax(final_logits(tiny_model, resid[-1, t: t + 1])[0].double().numpy())
        for l in range(cap.n_layers + 1):
            logits = final_logits(tiny_model, resid[l, t: t + 1])[0].numpy()
            p = scipy.special.softmax(logits.astype(np.float64))
            rank = int((logits > logits[np.argmax(q)]).sum())
            values = (scipy.special.rel_entr(q, p).sum(), scipy.stats.entropy(p), rank, np.log1p(rank), float(rank == 0))
            sums[:, owners[t], l] += values
    # One row through the unembedding and a chunk of rows round float32 logits differently (~1e-7 relative).
    np.testing.assert_allclose(result.prompt_parts, sums, rtol=1e-6, atol=1e-6)
    for i, name in enumerate(lens.STATISTICS):
        np.testing.assert_allclose(getattr(result, name), sums[i].sum(0) / cap.n_tokens, rtol=1e-6, atol=1e-6)
    assert result.kl[-1] == 0 and result.rank[-1] == 0 and result.top1[-1] == 1
    assert result.position == 9 and result.top_probs.shape == (cap.n_layers + 1, 3)


def test_float32_logits_are_within_the_stated_tolerance_of_a_float64_decoding(tiny_model):
    """The docstring's 1e-5 nats: the same states decoded by a float64 copy of the model."""
    cap = tiny_capture(tiny_model)
    float32 = lens.decode_states(tiny_model, cap.tokens_of("resid"))
    float64 = lens.decode_states(tiny_model.double(), cap.tokens_of("resid").double())
    for name in ("kl", "entropy"):
        np.testing.assert_allclose(float32[name], float64[name], atol=1e-5)


def test_statistics_through_a_reused_scratch_equal_fresh_ones_bit_for_bit():
    """One ``Scratch`` across calls of two shapes (its tensors replaced, then reused): the same values as a call
    with its own temporaries, and as ``torch.linalg.vecdot``'s dot products."""
    g = torch.Generator().manual_seed(0)
    scratch = Scratch()
    for rows in (5, 3, 3):
        z, target = torch.randn(rows, 50, generator=g) * 4, torch.randn(rows, 50, generator=g) * 4
        output = lens.output_distribution(target)
        reused, fresh = lens.lens_statistics(z, output, scratch), lens.lens_statistics(z, output)
        assert all(torch.equal(reused[name], fresh[name]) for name in lens.STATISTICS)
        shifted = z - z.amax(dim=1, keepdim=True)
        kl = output.neg_entropy - torch.linalg.vecdot(output.probs, shifted).double() + shifted.exp().sum(dim=1).double().log()
        assert torch.equal(reused["kl"], kl)


def test_the_decoded_last_state_is_the_forward_pass(tiny_llama):
    """Final norm + unembedding of the capture's last state against the model's own forward logits."""
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(2))
    cap = ld.capture(tiny_llama, ids, streams=lens.STREAMS, exclude=())
    with torch.inference_mode():
        forward = tiny_llama(ids).float().reshape(-1, tiny_llama.cfg.d_vocab)
    decoded = final_logits(tiny_llama, cap.tokens_of("resid")[-1])
    torch.testing.assert_close(decoded, forward, rtol=1e-5, atol=1e-5)
    stats = lens.lens_statistics(decoded, lens.output_distribution(forward))
    assert float(stats["kl"].abs().max()) < 1e-6 and int(stats["rank"].max()) == 0


def test_affine_lens_on_a_tiny_model_reads_back_its_parts(tiny_model):
    cap = tiny_capture(tiny_model, n_prompts=5, length=12)
    result = lens.measure(cap, model=tiny_model, control=None, affine_lens=True, lens_ridge=0.01)
    a = result.affine
    assert a.train_prompts == (0, 2, 4) and a.held_prompts == (1, 3)
    assert not a.prompt_parts[:, list(a.train_prompts)].any()  # training prompts contribute nothing held out
    held = lens.held_counts(a.held_prompts, np.ones(cap.n_prompts))
    np.testing.assert_allclose(a.logit_kl, result.prompt_parts[0].T @ held / (result.prompt_tokens @ held))
    assert np.all(a.r2 <= 1) and np.isfinite(a.kl).all()
    # Every prompt counted once is the data itself: the resample's pooling reproduces the measured fields.
    ones = np.ones(cap.n_prompts)
    again = lens.affine_fields(a.prompt_parts, a.target_sum, a.target_square, a.held_prompts, result.prompt_parts,
                               result.prompt_tokens, ones)
    np.testing.assert_allclose(again["r2"], a.r2, rtol=1e-12)
    np.testing.assert_allclose(lens.lens_fields(result.prompt_parts, result.prompt_tokens, ones)["kl"], result.kl, rtol=1e-12)


def test_resamples_move_the_statistics_and_the_verdicts_get_a_robustness(tiny_model):
    cap = tiny_capture(tiny_model, n_prompts=6)
    result = lens.measure(cap, model=tiny_model, control=None)
    draws = [result.resample(np.random.default_rng(s)) for s in range(5)]
    assert any(not np.allclose(d.kl, result.kl) for d in draws)
    assert all(d.kl[-1] == 0 for d in draws)
    verdict = result.verdicts(n_bootstrap=20)[0]
    assert verdict.n_resamples == 20 and verdict.bootstrap_share is not None
    assert result.verdicts()[1].verdict == "not testable here"  # no affine lens


def test_bad_options_are_clear_errors(tiny_model):
    cap = tiny_capture(tiny_model, n_prompts=1)
    with pytest.raises(ArgumentError, match="outside the first prompt"):
        lens.measure(cap, model=tiny_model, control=None, lens_position=10)
    with pytest.raises(ArgumentError, match="at least 2 prompts"):
        lens.measure(cap, model=tiny_model, control=None, affine_lens=True)
    with pytest.raises(ArgumentError, match="needs model="):
        lens.measure(cap, control=None)


@pytest.mark.slow
def test_an_encoder_is_refused_with_the_reason(minilm):
    cap = ld.capture(minilm, ["One short prompt here."], streams=lens.STREAMS)
    with pytest.raises(ArgumentError, match="not a causal language model"):
        lens.measure(cap, model=minilm, control=None)


@pytest.mark.slow
def test_smollm2_lens_and_its_control(smollm2, smollm2_diverse):
    """The last state against the forward pass on every prompt, then the lens with its control and the affine lens."""
    cap = smollm2_diverse
    decoded = final_logits(smollm2, cap.tokens_of("resid", cap.token_mask)[-1])
    with torch.inference_mode():
        forward = torch.cat([smollm2(cap.tokens[i: i + 1, :n])[0].float() for i, n in enumerate(cap.lengths)])
    torch.testing.assert_close(decoded, forward, rtol=1e-4, atol=1e-4)
    stats = lens.lens_statistics(decoded, lens.output_distribution(forward))
    assert float(stats["kl"].abs().max()) < 1e-4 and float(stats["top1"].mean()) == 1.0
    # The lens itself (with its control and the affine fit) on the first two prompts: the same code, a fraction of the time.
    cap = ld.capture(smollm2, PromptSet("diverse[:2]", cap.prompts.texts[:2], cap.prompts.labels[:2]), streams=lens.STREAMS)
    result = lens.measure(cap, model=smollm2, affine_lens=True)
    print(result.summary())
    print(result.control.summary())
    assert result.kl[-1] == 0 and result.control.kl[-1] == 0 and result.top1[-1] == 1
    assert result.provenance.n_tokens == cap.n_tokens and result.control.provenance.weights == "random"
    assert len(result.top_tokens) == cap.n_layers + 1 and result.position == cap.lengths[0] - 1
    assert np.isfinite(result.affine.r2).all() and result.affine.held_prompts == (1,)
