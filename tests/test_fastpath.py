"""Fast paths check themselves: taken where they agree, a warning and the reference path where they do not."""
import warnings

import pytest
import torch

from lensdyn.fastpath import FastPathWarning, agrees, disagreement, fast_paths, unavailable, verdict
from lensdyn.hooks import jacobian, patching
from lensdyn.hooks.jacobian import block_map
from lensdyn.hooks.patching import patch_sweeps


def test_agreement_is_recorded_and_a_disagreement_warns_once_with_its_size():
    model = torch.nn.Linear(2, 2)
    assert verdict(model, "x") is None
    assert agrees(model, "x", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]))
    assert fast_paths(model)["x"].taken and fast_paths(model)["x"].disagreement < 1e-6
    with pytest.warns(FastPathWarning, match=r"fast path 'y' disagrees with the reference path by 0\.25"):
        assert not agrees(model, "y", torch.tensor([3.0, 0.0]), torch.tensor([4.0, 0.0]))
    assert verdict(model, "y") is False
    assert disagreement(torch.zeros(2), torch.zeros(3)) == float("inf")  # shapes that differ never agree


def test_an_unavailable_fast_path_warns_only_where_it_should_have_been_there():
    model = torch.nn.Linear(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unavailable(model, "not here", "no such layers", warn=False)
    with pytest.warns(FastPathWarning, match="'cached' is unavailable"):
        unavailable(model, "cached", "the cache never reached the attention", warn=True)
    assert verdict(model, "not here") is False and verdict(model, "cached") is False


def _sweep_inputs(model):
    clean = [torch.tensor([5, 9, 17, 33, 2, 8, 40]), torch.tensor([7, 3, 3, 12, 60])]
    edited = [torch.randn(3, len(t), 64, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(clean)]
    return clean, edited, [[-1], [-2]], [[-1], [-2]]


def test_the_patch_sweep_prefix_cache_is_taken_where_it_agrees(tiny_llama):
    args = _sweep_inputs(tiny_llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        cached = patch_sweeps(tiny_llama, *args)
    assert fast_paths(tiny_llama)[patching.PREFIX_CACHE].taken
    torch.testing.assert_close(cached, patch_sweeps(tiny_llama, *args, prefix_cache=False), atol=1e-4, rtol=1e-4)


def test_a_broken_patch_sweep_prefix_cache_warns_and_falls_back_to_whole_prompts(tiny_llama, monkeypatch):
    args = _sweep_inputs(tiny_llama)
    reference = patch_sweeps(tiny_llama, *args, prefix_cache=False)
    real = patching._prefix_cache
    # A cache of the wrong prefix: the rows then continue a text that was never there.
    monkeypatch.setattr(patching, "_prefix_cache", lambda model, prefixes: real(model, [(p + 1) % 100 for p in prefixes]))
    with pytest.warns(FastPathWarning, match=r"'patch-sweep prefix cache' disagrees with the reference path by \d"):
        swept = patch_sweeps(tiny_llama, *args)
    torch.testing.assert_close(swept, reference)
    assert not fast_paths(tiny_llama)[patching.PREFIX_CACHE].taken
    with warnings.catch_warnings():  # off for this model from now on, without a second warning
        warnings.simplefilter("error", FastPathWarning)
        torch.testing.assert_close(patch_sweeps(tiny_llama, *args), reference)


def test_the_jacobian_prefix_cache_is_taken_and_a_broken_one_falls_back(tiny_llama, monkeypatch):
    states = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    fast, z0 = block_map(tiny_llama, 1, states, -1)
    slow, _ = block_map(tiny_llama, 1, states, -1, prefix_cache=False)
    assert fast.__name__ == "g" and fast_paths(tiny_llama)[jacobian.PREFIX_CACHE].taken
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    with torch.enable_grad():
        torch.testing.assert_close(torch.func.jvp(fast, (z0,), (v,))[1], torch.func.jvp(slow, (z0,), (v,))[1],
                                   atol=1e-5, rtol=1e-4)

    def forgetful(self, keys, values, *args, **kwargs):  # a cache that forgets the context it holds
        if self.keys is None:
            self.keys, self.values = keys, values
        return keys, values

    monkeypatch.setattr(jacobian._Prefix, "update", forgetful)
    with pytest.warns(FastPathWarning, match="'jacobian prefix cache' disagrees"):
        f, z0 = block_map(tiny_llama, 2, states, -1)
    assert f.__name__ == "f" and not fast_paths(tiny_llama)[jacobian.PREFIX_CACHE].taken
    reference, _ = block_map(tiny_llama, 2, states, -1, prefix_cache=False)
    torch.testing.assert_close(f(z0), reference(z0))


def test_the_cache_keyword_reaches_the_attention_of_a_hugging_face_layer(tiny_llama):
    """Whichever keyword transformers uses (``cache=`` from 5.24, ``past_key_values=`` before), the cache fills."""
    from transformers import DynamicCache

    from lensdyn.hooks.compat import cache_keyword, route_cache_keyword

    route_cache_keyword(tiny_llama)
    keyword = cache_keyword(tiny_llama.original_model)
    assert keyword == cache_keyword(tiny_llama.original_model.model.layers[0]) in ("cache", "past_key_values")
    cache = DynamicCache(config=tiny_llama.original_model.config)
    with torch.inference_mode():
        tiny_llama(torch.tensor([[5, 9, 17, 33]]), **{keyword: cache})
    assert cache.get_seq_length() == 4
