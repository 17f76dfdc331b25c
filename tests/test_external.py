"""Bring your own activations (``lensdyn.hooks.external``): a cache or hidden states the user already has make
the capture ``ld.capture`` would, and every convention it keeps is checked, not assumed."""
import pytest
import torch

import lensdyn as ld
from lensdyn.analyses import expansion, norms
from lensdyn.errors import ArgumentError
from lensdyn.hooks.external import normalised_tokens


def ragged(model, n=3, length=9, seed=0):
    """Token ids ``[n, length]`` and a mask with a right-padded row and a left-padded one."""
    tokens = torch.randint(3, model.cfg.d_vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, :3] = False
    return tokens, mask


def real_ids(tokens, mask):
    return [row[m].tolist() for row, m in zip(tokens, mask)]


def assert_same_capture(mine, reference, atol=1e-6):
    assert set(mine.packed) == set(reference.packed)
    for stream, value in reference.packed.items():
        torch.testing.assert_close(mine.packed[stream], value, atol=atol, rtol=0, msg=stream)
    assert torch.equal(mine.tokens, reference.tokens) and torch.equal(mine.mask, reference.mask)
    assert mine.str_tokens == reference.str_tokens


def hidden_states_of(model, tokens, mask):
    """Hugging Face's own ``output_hidden_states`` and the final norm's input (saved by a pre-hook)."""
    hf = model.original_model
    saved = []
    handle = hf.model.norm.register_forward_pre_hook(lambda module, args: saved.append(args[0]))
    try:
        with torch.no_grad():
            out = hf(tokens, attention_mask=mask.long(), output_hidden_states=True)
    finally:
        handle.remove()
    return out.hidden_states, saved[0]


def test_activation_cache_equals_capture_on_every_stream(tiny_model):
    tokens, mask = ragged(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens, attention_mask=mask.long())
    cap = ld.Capture.from_activation_cache(cache, tiny_model, tokens, attention_mask=mask)
    assert_same_capture(cap, ld.capture(tiny_model, real_ids(tokens, mask)))


def test_an_analysis_on_the_cache_equals_it_on_the_capture(tiny_model):
    tokens, mask = ragged(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens, attention_mask=mask.long())
    mine = ld.Capture.from_activation_cache(cache, tiny_model, tokens, attention_mask=mask)
    reference = ld.capture(tiny_model, real_ids(tokens, mask))
    for analysis in (norms, expansion):
        kwargs = {"control": None} | ({"n_permutations": 5, "seed": 0, "model": tiny_model} if analysis is expansion else {})
        a, b = analysis.measure(mine, **kwargs), analysis.measure(reference, **kwargs)
        assert_close_data(a.to_dict() | {"provenance": None}, b.to_dict() | {"provenance": None})


FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def assert_close_data(a, b, path="result"):
    """Plain result data equal, numbers to float32 batching noise (a padded batch moves them by ~1e-7): relatively, and
    absolutely to float32's resolution for the dimensionless numbers near 0 (a CV of post-LN norms, ~4e-5, is
    itself made of that noise; which noise depends on the thread count's matmul splits)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close_data(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_data(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=2 * FLOAT32_EPS, nan_ok=True), path
    else:
        assert a == b, path


def test_a_filtered_cache_names_the_missing_hook(tiny_model):
    tokens, _ = ragged(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda name: name.endswith(("hook_resid_pre", "resid_post")))
    cap = ld.Capture.from_activation_cache(cache, tiny_model, tokens)
    assert set(cap.packed) == {"resid"}
    with pytest.raises(ArgumentError, match=r"'attn_in'.*blocks\.0\.ln1\.hook_out"):
        cap.require_streams(("resid", "attn_in"))
    with pytest.raises(ArgumentError, match=r"blocks\.0\.hook_attn_out.*'attn_out'"):
        ld.Capture.from_activation_cache(cache, tiny_model, tokens, streams=("resid", "attn_out"))


def test_a_cache_of_another_model_or_other_tokens_is_refused(tiny_model, tiny_gqa_model):
    tokens, _ = ragged(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens)
    with pytest.raises(ArgumentError, match="made by another model"):
        ld.Capture.from_activation_cache(cache, tiny_gqa_model, tokens)
    detached = dict(cache.items())  # a plain mapping: no model attached, so only the comparison can tell
    with pytest.raises(ArgumentError, match="differs from .* own pass"):
        ld.Capture.from_activation_cache(detached, tiny_gqa_model, tokens)
    with pytest.raises(ArgumentError, match="differs from .* own pass"):
        ld.Capture.from_activation_cache(cache, tiny_model, tokens.flip(1))
    with pytest.raises(ArgumentError, match="shape"):
        ld.Capture.from_activation_cache(cache, tiny_model, tokens[:, :5])
    deeper = {**detached, "blocks.7.hook_resid_pre": detached["blocks.0.hook_resid_pre"]}
    with pytest.raises(ArgumentError, match="block 7 .* 3 blocks"):
        ld.Capture.from_activation_cache(deeper, tiny_model, tokens)


def test_exclusions_are_applied_as_capture_applies_them(tiny_model):
    tokens, mask = ragged(tiny_model)
    _, cache = tiny_model.run_with_cache(tokens, attention_mask=mask.long())
    for exclude in ((), ("first",), ("first", "massive")):
        cap = ld.Capture.from_activation_cache(cache, tiny_model, tokens, attention_mask=mask, exclude=exclude,
                                               check=False)
        reference = ld.capture(tiny_model, real_ids(tokens, mask), exclude=exclude)
        assert torch.equal(cap.mask, reference.mask) and cap.massive_positions == reference.massive_positions
    with pytest.raises(ArgumentError, match="exclude"):
        ld.Capture.from_activation_cache(cache, tiny_model, tokens, exclude=("last",))
    holey = mask.clone()
    holey[0, 4] = False
    with pytest.raises(ArgumentError, match="contiguous"):
        ld.Capture.from_activation_cache(cache, tiny_model, tokens, attention_mask=holey)


def test_normalised_tokens_tells_a_norm_output_from_its_input():
    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.2, 3.0, 16))
    x = torch.randn(5, 16) * 7
    assert normalised_tokens(norm(x).detach(), norm).all() and not normalised_tokens(x, norm).any()


def test_hidden_states_equal_capture_on_resid(tiny_llama):
    tokens, mask = ragged(tiny_llama)
    hidden, last = hidden_states_of(tiny_llama, tokens, mask)
    cap = ld.Capture.from_hidden_states(hidden, tiny_llama, tokens, mask, last_state=last)
    assert_same_capture(cap, ld.capture(tiny_llama, real_ids(tokens, mask), streams=("resid",)))
    with pytest.raises(ArgumentError, match="'attn_out'.*hidden states hold the residual states only"):
        cap.require_streams(("attn_out",))


def test_hidden_states_conventions_are_checked_not_assumed(tiny_llama):
    tokens, mask = ragged(tiny_llama)
    hidden, last = hidden_states_of(tiny_llama, tokens, mask)
    with pytest.raises(ArgumentError, match="after the final norm.*last_state="):
        ld.Capture.from_hidden_states(hidden, tiny_llama, tokens, mask)
    with pytest.raises(ArgumentError, match="final='pre_norm', but .* output"):
        ld.Capture.from_hidden_states(hidden, tiny_llama, tokens, mask, final="pre_norm")
    own = (*hidden[:-1], last)  # a tuple of states: its last entry is the norm's input
    cap = ld.Capture.from_hidden_states(own, tiny_llama, tokens, mask, final="pre_norm")
    with pytest.raises(ArgumentError, match="final='post_norm', but .* input"):
        ld.Capture.from_hidden_states(own, tiny_llama, tokens, mask, final="post_norm", last_state=last)
    assert cap.n_layers == 3
    with pytest.raises(ArgumentError, match="3 hidden states for .* 3 blocks"):
        ld.Capture.from_hidden_states(hidden[1:], tiny_llama, tokens, mask, last_state=last)
    with pytest.raises(ArgumentError, match="final must be"):
        ld.Capture.from_hidden_states(hidden, tiny_llama, tokens, mask, final="post")


@pytest.mark.slow
def test_smollm2_cache_and_hidden_states_equal_its_capture(smollm2):
    prompts = ["The river rose to the fourth step of the old mill before dawn.", "Snow fell all night."]
    reference = ld.capture(smollm2, prompts)
    tokens, mask = reference.tokens, reference.token_mask  # the checkpoint's tokenisation: no BOS
    with_bos = ld.capture(smollm2, prompts, prepend_bos=True, streams=("resid",))
    _, cache = smollm2.run_with_cache(with_bos.tokens, attention_mask=with_bos.token_mask.long())
    with pytest.raises(ArgumentError, match="real positions per prompt"):  # text read without the BOS it was run with
        ld.Capture.from_activation_cache(cache, smollm2, prompts, attention_mask=with_bos.token_mask)
    _, cache = smollm2.run_with_cache(tokens, attention_mask=mask.long())
    cap = ld.Capture.from_activation_cache(cache, smollm2, prompts, attention_mask=mask)
    assert_same_capture(cap, reference, atol=1e-6 * float(reference.packed["resid"].abs().max()))
    mine, theirs = (expansion.measure(c, model=smollm2, control=None, n_permutations=5, seed=0) for c in (cap, reference))
    torch.testing.assert_close(torch.tensor(mine.euclidean.mean_norm), torch.tensor(theirs.euclidean.mean_norm))
    hidden, last = hidden_states_of(smollm2, tokens, mask)
    with pytest.raises(ArgumentError, match="after the final norm"):  # trained gains: still read off the entry
        ld.Capture.from_hidden_states(hidden, smollm2, tokens, mask)
    resid = ld.Capture.from_hidden_states(hidden, smollm2, tokens, mask, last_state=last)
    scale = float(reference.packed["resid"].abs().max())
    torch.testing.assert_close(resid.packed["resid"], reference.packed["resid"], atol=1e-6 * scale, rtol=0)
