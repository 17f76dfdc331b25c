"""Steering: hooks that always come off, exact no-ops, the redshift correction on a linear residual model, smollm2."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

import lensdyn as ld
from lensdyn.analyses import steering
from lensdyn.errors import ArgumentError, PromptError, UnsupportedArchitectureError
from lensdyn.hooks.patching import last_logits
from lensdyn.hooks.steering import steered_last_logits
from lensdyn.hooks.steering import steering as steer
from lensdyn.ops import token_norms
from lensdyn.analyses.steering import CONTRAST_SETS, load_contrast, resolve_contrast


def _hook_count(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}  # the bridge lists a hook point under its aliases too
    return sum(len(hp.fwd_hooks) for hp in points.values())


def test_hooks_come_off_when_the_body_raises(tiny_model):
    tokens = torch.randint(0, 50, (2, 6))
    clean = last_logits(tiny_model, tokens)
    before = _hook_count(tiny_model)
    with pytest.raises(RuntimeError, match="inside"):
        with steer(tiny_model, torch.ones(32), layer=1, alpha=3.0):
            assert _hook_count(tiny_model) == before + 1
            raise RuntimeError("inside the block")
    assert _hook_count(tiny_model) == before
    torch.testing.assert_close(last_logits(tiny_model, tokens), clean, atol=0, rtol=0)


def test_alpha_zero_reproduces_the_unsteered_logits_exactly(tiny_model):
    tokens = torch.randint(0, 50, (3, 7))
    clean = tiny_model(tokens)
    with steer(tiny_model, torch.randn(32), layer=0, alpha=0.0):
        steered = tiny_model(tokens)
    assert torch.equal(steered, clean)


def test_the_vector_lands_at_its_block_from_its_position(tiny_model):
    tokens = torch.randint(0, 50, (2, 8))
    vector = torch.randn(32)
    clean = ld.capture(tiny_model, tokens.tolist(), streams=("resid",), exclude=())
    with steer(tiny_model, vector, layer=2, alpha=0.5, from_position=3):
        steered = ld.capture(tiny_model, tokens.tolist(), streams=("resid",), exclude=())
    diff = steered.resid - clean.resid
    assert diff[:2].abs().max() == 0  # states before block 2 are untouched
    torch.testing.assert_close(diff[2, :, 3:], (0.5 * vector).expand(2, 5, 32), atol=1e-5, rtol=0)
    assert diff[2, :, :3].abs().max() == 0  # positions before from_position run unsteered


def test_bad_steering_input_fails_fast(tiny_model):
    with pytest.raises(ArgumentError, match="outside"):
        with steer(tiny_model, torch.ones(32), layer=3):
            pass
    with pytest.raises(ArgumentError, match="shape"):
        with steer(tiny_model, torch.ones(31), layer=0):
            pass
    with pytest.raises(ArgumentError, match="NaN"):
        with steer(tiny_model, torch.full((32,), float("nan")), layer=0):
            pass
    assert _hook_count(tiny_model) == 0


class _Scale(nn.Module):
    """A linear residual block: ``h + (s - 1) h``."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s
        self.hook_resid_pre, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, h):
        h = self.hook_resid_pre(h)
        return self.hook_resid_post(h + (self.s - 1.0) * h)


class LinearResidual(HookedRootModule):
    """Embedding, blocks that scale the stream by ``s_l`` (so ``a(l) = prod_{k<l} s_k``), an identity final norm."""

    def __init__(self, scales, d_model=16, vocab=12):
        super().__init__()
        self.cfg = SimpleNamespace(n_layers=len(scales), d_model=d_model, attention_dir="causal")
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(_Scale(s) for s in scales)
        self.ln_final = nn.Identity()
        self.unembed = nn.Linear(d_model, vocab, bias=False)
        self.setup()

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.ln_final(h))


def test_redshift_correction_is_exact_on_a_linear_residual_model():
    scales = [3.0, 0.5, 2.0, 4.0, 1.5]
    model = LinearResidual(scales).eval()
    a = np.concatenate([[1.0], np.cumprod(scales)])
    # Contrast: token 1 vs token 2 in the same frame; the vector at state l is a(l) (e_1 - e_2).
    texts = torch.tensor([[5, 1, 6], [5, 1, 7], [5, 2, 6], [5, 2, 7]])
    _, cache = model.run_with_cache(texts)
    resid = torch.stack([cache[f"blocks.{l}.hook_resid_pre"] for l in range(len(scales))])
    vectors = steering.difference_of_means(resid, torch.ones(4, 3, dtype=torch.bool), torch.tensor([True, True, False, False]))
    np.testing.assert_allclose(token_norms(vectors).numpy(), a[:-1] * float(vectors[0].norm()), rtol=1e-5)
    # Targets read the vector's direction with a positive sign, so the effect grows with the magnitude.
    direction = vectors[0] / vectors[0].norm()
    with torch.no_grad():
        model.unembed.weight[10] = direction.float()
        model.unembed.weight[11] = -direction.float()
    positive, negative = torch.tensor([10]), torch.tensor([11])

    layers = list(range(len(scales)))
    pairs = [(s, t) for s in layers for t in layers]
    eval_tokens = torch.tensor([[3, 4, 8], [9, 0, 0]])
    last = torch.tensor([2, 0])
    _, eval_cache = model.run_with_cache(eval_tokens)
    norms = np.array([float(eval_cache[f"blocks.{l}.hook_resid_pre"][0].norm(dim=-1).mean()) for l in layers])
    relative = np.array([0.1, 0.3, 1.0, 3.0])
    effect, kl = steering.steering_sweep(model, vectors, pairs, relative, norms, eval_tokens, last, positive, negative)
    assert (kl >= -1e-9).all()
    mean = effect.mean(-1).reshape(len(layers), len(layers), len(relative))
    target = float(np.median(mean.max(-1))) / 2
    needed = steering.magnitude_for_effect(relative * norms[None, :, None], mean, target)
    assert np.isfinite(needed).all()
    alpha = steering.transfer_alphas(needed, token_norms(vectors).numpy(),
                                     {"redshift": steering.redshift_factors(a, np.array(layers), np.array(layers))}, norms)
    assert steering.log_spread(alpha["redshift"]) < 1e-5  # one alpha transfers between every pair of blocks
    assert steering.log_spread(alpha["none"]) > 0.3  # uncorrected, alpha* follows a(t) / a(s)
    np.testing.assert_allclose(alpha["none"] / alpha["redshift"], steering.redshift_factors(a, np.array(layers),
                                                                                          np.array(layers)), rtol=1e-4)


def test_pure_functions_on_known_inputs():
    relative = np.array([0.25, 0.5, 1.0])
    assert steering.efficacy(relative, np.array([[0.75, 1.5, 0.0]]))[0] == pytest.approx(3.0)
    # First crossing, not a later one: the effect rises, falls and rises again.
    found = steering.magnitude_for_effect(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 0.0, 0.0, 3.0]), 1.0)
    assert float(found) == pytest.approx(0.5)
    assert np.isnan(steering.magnitude_for_effect(np.array([1.0]), np.array([5.0]), float("nan")))
    logits = torch.randn(4, 9)
    assert torch.allclose(steering.kl_divergence(logits, logits), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ArgumentError, match="negative"):
        steering.difference_of_means(torch.zeros(1, 2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool))


def _paired_states(base, concept_positive, concept_negative, mask):
    """``[1 state, positive prompts then negative prompts, pos, d]``: one shared frame per pair, plus each class's concept."""
    return torch.cat([base + concept_positive, base + concept_negative])[None]


def test_mean_and_last_token_extractions_recover_a_planted_direction():
    gen = torch.Generator().manual_seed(0)
    n_pairs, n_pos, d = 5, 6, 8
    base = torch.randn(n_pairs, n_pos, d, generator=gen)
    base[:, 0] = 1e3  # the excluded first position: a massive activation must not reach any vector
    mask = torch.ones(2 * n_pairs, n_pos, dtype=torch.bool)
    mask[:, 0] = False
    mask[n_pairs - 1, 4:] = mask[-1, 4:] = False  # one pair is shorter (right padding): its last token is position 3
    positive = torch.arange(2 * n_pairs) < n_pairs
    w, q = torch.eye(d)[0], torch.eye(d)[1]
    # Every included token carries +w / -w; only the last real token carries +q / -q (what CAA reads).
    concept = torch.zeros(n_pairs, n_pos, d)
    concept[:, 1:] = w
    last = steering.last_token_mask(mask[:n_pairs])
    concept[last] += 3 * q
    states = _paired_states(base, concept, -concept, mask)
    states[:, :, 0] = 1e3
    out = steering.extraction_vectors(states, mask, positive, ("mean", "last"))
    # mean: 2w from every token, plus the last token's 2 * 3q diluted by the prompt's included length.
    lengths = mask[:n_pairs].sum(1).to(torch.float64)
    expected_mean = 2 * w.double() + (6 / lengths).mean() * q.double()
    torch.testing.assert_close(out["mean"][0], expected_mean)
    torch.testing.assert_close(out["last"][0], 2 * w.double() + 6 * q.double())


def test_last_token_mask_skips_padding_and_exclusions():
    mask = torch.tensor([[False, True, True, True, False], [False, True, False, False, False], [False, False, True, True, True]])
    assert steering.last_token_mask(mask).nonzero().tolist() == [[0, 3], [1, 1], [2, 4]]
    with pytest.raises(ArgumentError, match="no included token"):
        steering.last_token_mask(torch.tensor([[True, False], [False, False]]))


def test_paired_pca_finds_the_axis_of_spread_with_the_mean_differences_sign():
    gen = torch.Generator().manual_seed(1)
    d = 6
    q = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0).double()
    spread = torch.tensor([3.0, -2.0, 1.0, -1.5, -0.5], dtype=torch.float64)  # mean 0: the centred differences lie on q
    mean = 0.7 * q + torch.tensor([0, 0, 0, 0, 0, 2.0], dtype=torch.float64) - 0.7 * q[5] * torch.eye(d)[5].double()
    differences = (mean + spread[:, None] * q)[None]
    vector = steering.paired_principal_vector(differences)[0]
    torch.testing.assert_close(vector, float(q @ mean) * q)  # the mean difference projected on the principal axis
    assert float(vector @ mean) > 0  # points with the mean difference, whichever sign the SVD returned
    torch.testing.assert_close(steering.paired_principal_vector(-differences)[0], -vector)
    # Through extraction_vectors: positive i pairs with negative i at the last token.
    states = torch.zeros(1, 10, 2, d, dtype=torch.float64)
    states[0, :5, 1] = differences[0]
    out = steering.extraction_vectors(states, torch.ones(10, 2, dtype=torch.bool), torch.arange(10) < 5, ("pca",))
    torch.testing.assert_close(out["pca"][0], vector)
    with pytest.raises(ArgumentError, match="cannot pair"):
        steering.extraction_vectors(states[:, :9], torch.ones(9, 2, dtype=torch.bool), torch.arange(9) < 5, ("pca",))
    with pytest.raises(ArgumentError, match="unknown extraction"):
        steering.check_extractions(("mean", "svd"))


def test_lens_accessibility_on_a_synthetic_unembedding():
    model = LinearResidual([1.0, 1.0]).eval()  # identity final norm: the lens is W_U x
    gen = torch.Generator().manual_seed(2)
    positive, negative = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    pos_ids, neg_ids = torch.tensor([1, 4]), torch.tensor([7])
    w = model.unembed.weight.detach().double()
    readout = w[pos_ids].mean(0) - w[neg_ids].mean(0)
    expected = ((positive - negative).double() @ readout).numpy()
    np.testing.assert_allclose(steering.lens_accessibility(model, positive, negative, pos_ids, neg_ids), expected, rtol=1e-5)


def test_lens_accessibility_applies_the_final_norm(tiny_llama):
    # RMSNorm is scale-free: the lens reads a state and ten times it alike, so A cannot grow with the norm.
    gen = torch.Generator().manual_seed(3)
    d = tiny_llama.cfg.d_model
    positive, negative = torch.randn(1, d, generator=gen), torch.randn(1, d, generator=gen)
    ids = torch.tensor([1]), torch.tensor([2])
    once = steering.lens_accessibility(tiny_llama, positive, negative, *ids)
    np.testing.assert_allclose(steering.lens_accessibility(tiny_llama, 10 * positive, 10 * negative, *ids), once, rtol=1e-3)


def test_share_more_predictive_on_known_rankings():
    x = np.arange(10.0)
    noise = np.random.default_rng(0).permutation(10).astype(float)
    assert steering.share_more_predictive(x, -np.exp(x), noise, 100) == 1.0  # |rho| = 1 on every resample
    assert steering.share_more_predictive(x, noise, np.exp(x), 100) == 0.0


def test_contrast_sets_and_user_files(tmp_path):
    assert resolve_contrast("sentiment") is CONTRAST_SETS["sentiment"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"positive": ["up"], "negative": ["down"], "evaluation": ["it went"],
                                "positive_targets": [" up"], "negative_targets": [" down"]}))
    assert load_contrast(path).name == "mine"
    path.write_text(json.dumps({"positive": ["up"]}))
    with pytest.raises(PromptError, match="lacks"):
        resolve_contrast(path)
    with pytest.raises(PromptError, match="unknown contrast"):
        resolve_contrast("politeness")


def test_the_core_lists_exactly_the_contrast_set_names():
    # lensdyn.prompts (core) cannot import this analysis, so it lists the names its hints refuse as prompts.
    from lensdyn.prompts import CONTRAST_SET_NAMES

    assert CONTRAST_SET_NAMES == tuple(CONTRAST_SETS)


def test_smollm2_steering_measure(smollm2, smollm2_diverse, tmp_path):
    result = steering.measure(smollm2_diverse, model=smollm2, control=None, layers=[2, 10, 20, 27],
                              transfer_layers=[10, 20, 27], relative=(0.25, 0.5, 1.0), extractions=steering.EXTRACTIONS,
                              n_evaluation=2, n_bootstrap=20)
    assert result.effect.shape == (4, 3) and result.transfer.magnitude.shape == (3, 3)
    # The sentiment vector pushes the positive targets up wherever it is added, at every small size.
    assert (result.effect[:, :2] > 0).all()
    assert (result.kl >= 0).all() and np.isfinite(result.efficacy).all()
    assert result.a[0] == 1.0 and len(result.hubble) == smollm2.cfg.n_layers
    assert result.conventions.causal_metrics == ("causal_inverse",)  # the metric of a_causal, by name
    assert {v.verdict for v in result.verdicts()} <= {"holds", "does not hold", "not testable here"}
    assert "spread of log10 alpha*" in result.summary()
    # Layer choice and extraction conventions: the lens at every state, the three extractions at every steered block.
    assert result.accessibility.shape == (smollm2.cfg.n_layers,) and np.isfinite(result.accessibility).all()
    assert np.isfinite(result.efficacy_access_spearman) and 0 <= result.access_beats_h <= 1
    assert set(result.efficacies) == set(steering.EXTRACTIONS) and set(result.transfers) == set(steering.EXTRACTIONS)
    for name, cosine in result.extraction_cosine.items():
        assert cosine.shape == (smollm2.cfg.n_layers,) and (np.abs(cosine[1:]) <= 1 + 1e-9).all()
        assert np.isfinite(result.extraction_efficacy[name]).all()
        # Every sentiment text ends on ".": at the embeddings the last-token vectors are zero, with no direction.
        assert np.isnan(cosine[0])
    assert ld.load_result(result.to_json(tmp_path / "steering.json")) == result
    assert len(result.best_extraction) == 4 and set(result.best_extraction) <= set(steering.EXTRACTIONS)
    verdicts = {v.claim: v.verdict for v in result.verdicts(n_bootstrap=0)}
    assert verdicts["lens accessibility of the targets predicts steering efficacy better than H(l)"] in {
        "holds", "does not hold"}
    assert "6 (paired-PCA repeng vectors): redshift predicts steering transfer (vs none)" in verdicts
    only_mean = steering.measure(smollm2_diverse, model=smollm2, control=None, layers=[2, 10], transfer_layers=[2, 10],
                                 relative=(0.5,), n_evaluation=2, n_bootstrap=2)  # the default: lensdyn's vector alone
    assert only_mean.extraction_efficacy == {} and list(only_mean.transfers) == ["mean"]


def test_steered_logits_match_a_hugging_face_forward_hook(smollm2, smollm2_reference):
    """Independent path: the same vector added to the input of HF's decoder layer 6 by a pre-forward hook."""
    ids = smollm2.tokenizer("The food at the new restaurant was", add_special_tokens=False, return_tensors="pt")["input_ids"]
    vector = torch.randn(smollm2.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 5
    ours = steered_last_logits(smollm2, ids, torch.tensor([ids.shape[1] - 1]), {6: vector[None]})

    def add(module, args, kwargs):
        return (args[0] + vector,) + args[1:], kwargs

    handle = smollm2_reference.model.layers[6].register_forward_pre_hook(add, with_kwargs=True)
    try:
        with torch.no_grad():
            reference = smollm2_reference(ids).logits[:, -1]
    finally:
        handle.remove()
    assert (ours - reference).abs().max() < 1e-3 * reference.abs().max()
    with torch.no_grad():
        unsteered = smollm2_reference(ids).logits[:, -1]
    assert (ours - unsteered).abs().max() > 0.1  # the vector did something


def test_encoders_and_multi_token_targets_are_refused(minilm, smollm2, smollm2_diverse):
    with pytest.raises(UnsupportedArchitectureError, match="causal"):
        steering.measure(minilm, ["a short text here"], control=None, layers=[0, 1], n_bootstrap=2)
    mine = CONTRAST_SETS["sentiment"].__class__(
        name="multi", positive=("good",), negative=("bad",), evaluation=("it was",),
        positive_targets=(" kinda",), negative_targets=(" bad",))
    with pytest.raises(PromptError, match="one-token"):
        steering.measure(smollm2_diverse, model=smollm2, control=None, contrast=mine, layers=[0, 1], n_bootstrap=2)
