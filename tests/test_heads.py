"""Per-head writes (``lensdyn.hooks.heads``) and the per-head analysis (``lensdyn.analyses.heads``).

Known answers: over every layout family of the zoo the heads' writes plus the output bias are
``attn_out`` on every block (biases made nonzero first, so the bias is really tested); two heads with
planted writes give hand-computed shares; on smollm2-135m the heads' parts add up to expansion's
attention growth per block.
"""
import dataclasses

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import lensdyn as ld
from lensdyn.prompts import PromptSet, get_prompts
from conftest import word_tokenizer
from lensdyn.analyses import expansion, heads
from lensdyn.errors import ArgumentError, UnsupportedArchitectureError
from lensdyn.hooks.heads import head_capture
from zoo import families

FAMILIES = families()
# Three prompts of different lengths, batched two at a time longest first ([1, 2], then [0]): padding and the
# way back from the batches' order to the packed order are exercised.
PROMPTS = [torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 9, 8)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def biased_family(request, tmp_path_factory):
    """A zoo checkpoint whose biases are all nonzero (Hugging Face initialises them to zero)."""
    name = request.param
    config, model_class = FAMILIES[name]
    torch.manual_seed(0)
    hf_model = model_class(config)
    with torch.no_grad():
        for parameter_name, parameter in hf_model.named_parameters():
            if parameter_name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter))
    path = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(path)
    word_tokenizer(config.vocab_size).save_pretrained(path)
    return name, ld.load_model(str(path))


def test_heads_writes_plus_the_bias_are_attn_out_on_every_block(biased_family):
    name, model = biased_family
    n = model.cfg.n_layers
    cap, writes = head_capture(model, PROMPTS, exclude=(), keep=tuple(range(n)), batch_size=2)
    assert writes.cross.shape == (n, sum(map(len, PROMPTS)), model.cfg.n_heads)
    for block in range(n):
        attn_out = cap.packed["attn_out"][block]
        total = writes.writes[block].sum(1) + writes.bias[block]
        error = float((total - attn_out).norm() / attn_out.norm())
        assert error < 1e-5, f"{name} ({cap.model_info.layout}), block {block}: relative error {error:.1e}"
    if writes.has_bias:
        assert float(writes.bias[0].abs().max()) > 0.1, name
    # The reduced terms are the full writes' (the packed order is the capture's).
    h, d = cap.packed["resid"][:-1], cap.packed["attn_out"]
    torch.testing.assert_close(writes.norm[1], writes.writes[1].norm(dim=-1).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(writes.overlap[2], torch.einsum("thm,tm->th", writes.writes[2], d[2]).double(),
                               rtol=1e-4, atol=1e-5)
    growth = (2 * (h * d).sum(-1) + (d * d).sum(-1)).double()
    parts = (writes.cross + writes.overlap).sum(-1) + writes.bias_cross + writes.bias_overlap
    torch.testing.assert_close(parts, growth, rtol=1e-5, atol=1e-5 * float(growth.abs().max()))


def test_a_layout_without_hook_z_is_refused_by_name(tiny_model, monkeypatch):
    names = {k: v for k, v in tiny_model.hook_dict.items() if not k.endswith("hook_z")}
    monkeypatch.setattr(type(tiny_model), "hook_dict", property(lambda self: names))
    with pytest.raises(UnsupportedArchitectureError, match=r"pre-norm blocks\) has no hook point blocks.0.attn.hook_z"):
        head_capture(tiny_model, [[1, 2, 3]])


def test_keep_takes_block_indices(tiny_model):
    with pytest.raises(ArgumentError, match="keep= takes block indices 0..2"):
        head_capture(tiny_model, [[1, 2, 3]], keep=(3,))


def test_measure_on_a_capture_needs_its_model(tiny_model, tiny_gqa_model):
    cap = ld.capture(tiny_model, [[1, 2, 3, 4]], streams=heads.STREAMS)
    with pytest.raises(ArgumentError, match="needs model= too"):
        heads.measure(cap, control=None)
    with pytest.raises(ArgumentError, match="but the capture is of"):
        heads.measure(cap, model=tiny_gqa_model, control=None)


def test_two_planted_heads_have_hand_computed_shares():
    """One block, two heads, two tokens; x = (1, 0), d_1 = (1, 0), d_2 = (0, 2), no bias: d = (1, 2).
    Head 1: 2 x.d_1 + d_1.d = 2 + 1 = 3; head 2: 0 + 4 = 4 on the first token. The second token has
    x = (0, 1): head 1: 0 + 1 = 1, head 2: 4 + 4 = 8. Means 2 and 6 (sum 8 = mean of ||x+d||^2 - ||x||^2:
    (8 - 1 + 10 - 1) / 2 = 8), shares 2/8 and 6/8; gains (resid) mean ||d_h|| / mean ||x|| = 1 and 2."""
    x = torch.tensor([[1., 0.], [0., 1.]])
    w = torch.tensor([[[1., 0.], [0., 2.]]] * 2)  # [token, head, d_model]
    d = w.sum(1)
    from lensdyn.hooks.heads import write_terms

    cross, overlap, norm = (t[None] for t in write_terms(x, d, w))  # one block
    zero = torch.zeros(1, 2, dtype=torch.float64)
    parts = heads.head_parts(cross, overlap, norm, zero, torch.ones_like(zero), torch.ones_like(zero),
                             np.array([0, 0]), 1)
    stats = heads.head_statistics(parts, np.array([1]))
    np.testing.assert_allclose(stats["growth"], [[2.0, 6.0]])
    np.testing.assert_allclose(stats["share"], [[0.25, 0.75]])
    np.testing.assert_allclose(stats["attn_growth"], [(((x + d) ** 2).sum(1) - (x ** 2).sum(1)).mean()])
    np.testing.assert_allclose(stats["gain_resid"], [[1.0, 2.0]])
    assert stats["ranking"].tolist() == [[0, 1], [0, 0]]


def test_resample_repools_the_prompts(tiny_model):
    result = heads.measure(tiny_model, [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]], control=None)
    drawn = result.resample(np.random.default_rng(0))
    assert drawn.share.shape == result.share.shape and drawn.prompt_parts is None
    # Every prompt drawn once is the data itself.
    same = dataclasses.replace(result, **heads.head_statistics(result.prompt_parts, np.ones(3, dtype=np.int64)))
    np.testing.assert_allclose(same.share, result.share)


@pytest.mark.slow
def test_smollm2_heads_add_up_to_expansions_attention_growth(smollm2):
    diverse = get_prompts("diverse")  # its first three prompts: every code path, a third of the time
    cap = ld.capture(smollm2, PromptSet("diverse[:3]", diverse.texts[:3], diverse.labels[:3]), streams=expansion.STREAMS)
    grow = expansion.measure(cap, model=smollm2, control=None, n_permutations=5)
    result = heads.measure(cap, model=smollm2)
    assert result.growth.shape == (30, 9) and result.ov_radius.shape == (30, 9)
    np.testing.assert_allclose(result.growth.sum(1) + result.bias_growth, grow.attn_growth, rtol=1e-6,
                               atol=1e-6 * float(np.abs(grow.attn_growth).max()))
    assert not result.has_bias and np.all(result.bias_growth == 0)  # Llama-style attention has no output bias
    assert np.abs(result.share).sum() == pytest.approx(1.0)
    assert result.control is not None and result.control.provenance.weights == "random"
    fig = result.figure()
    assert isinstance(fig, go.Figure) and sum(isinstance(t, go.Heatmap) for t in fig.data) == 2
    print(result.summary())
