"""Every architecture family the write-ups used, as a tiny random checkpoint loaded through ``ld.load_model``.

Each family: the self-test (hooks fire, the layout's identities, the wrapped Hugging Face layers),
``resid`` against an independent Hugging Face model's ``hidden_states``, the default report's
analyses finite, one block's Jacobian against a dense one, a steering vector landing at its block,
and (causal models) a patch sweep against brute-force Hugging Face patching.
"""
import warnings

import numpy as np
import pytest
import torch

import lensdyn as ld
from conftest import tiny_checkpoint
from lensdyn.analyses import expansion, gains, metastability, norms
from lensdyn.errors import ArgumentError, UnsupportedArchitectureError
from lensdyn.fastpath import FastPathWarning, fast_paths
from lensdyn.hooks import fused_attention
from lensdyn.hooks.jacobian import block_map, dense_jacobian, jacobian_spectrum
from lensdyn.hooks.patching import patch_sweep
from lensdyn.hooks.selftest import self_test
from lensdyn.hooks.steering import steering
from zoo import LAYOUTS, VOCAB, decoder_layers, families

FAMILIES = families()
PROMPTS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    config, model_class = FAMILIES[name]
    path = tiny_checkpoint(tmp_path_factory.mktemp(name), config, model_class)
    model = ld.load_model(path)
    reference = model_class.from_pretrained(path, attn_implementation="eager").eval()
    return name, model, reference


def test_layout_self_test_and_hugging_face_hidden_states(family):
    name, model, reference = family
    assert model.lensdyn_info.layout == LAYOUTS[name]
    report = self_test(model, PROMPTS[0].tolist())
    assert report.passed, report.summary()
    cap = ld.capture(model, PROMPTS.tolist(), exclude=())
    with torch.inference_mode():
        hidden = reference(PROMPTS, output_hidden_states=True).hidden_states
    # HF's last entry is after the final norm on decoders (convention 1): compare the states before it.
    states = len(hidden) if LAYOUTS[name] == "post-norm" else len(hidden) - 1
    for l in range(states):
        torch.testing.assert_close(cap.resid[l], hidden[l], atol=1e-5, rtol=1e-5, msg=f"{name}: state {l}")
    decomposition = cap.resid[:-1] + cap.attn_out
    if LAYOUTS[name] == "parallel":
        assert "resid_mid" in cap.absent
        torch.testing.assert_close(decomposition + cap.mlp_out, cap.resid[1:], atol=1e-5, rtol=1e-5)
    elif LAYOUTS[name] != "post-norm":
        torch.testing.assert_close(decomposition, cap.resid_mid, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cap.resid_mid + cap.mlp_out, cap.resid[1:], atol=1e-5, rtol=1e-5)


def test_default_report_analyses_are_finite(family):
    name, model, _ = family
    cap = ld.capture(model, PROMPTS.tolist(), exclude=("first",))
    attn, mlp = gains.measure(cap, model=model, control=None), gains.measure(cap, model=model, control=None, reference="resid")
    meta = metastability.measure(cap, model=model, control=None, repeated=False)
    numbers = {
        "norms": norms.measure(cap).mean, "gains": np.stack([attn.attn_gain, attn.mlp_gain, mlp.mlp_gain, mlp.resid_gain]),
        "mass near one": np.stack([p.mass_near_one for p in meta.prompts]),
    }
    results = [attn, meta]
    if name == "albert":  # its head projects to embedding_size first: W_U does not read the residual stream
        with pytest.raises(UnsupportedArchitectureError, match="unembedding reads a 32-dimensional space"):
            expansion.measure(cap, model=model, control=None)
    else:
        grow = expansion.measure(cap, model=model, control=None, n_permutations=5)
        numbers["expansion"] = np.stack([grow.euclidean.scale_factor, grow.causal.scale_factor])
        numbers["growth"] = np.stack([grow.attn_growth, grow.mlp_growth])
        results.append(grow)
    for label, values in numbers.items():
        assert np.isfinite(values).all(), (name, label)
    assert all(r.conventions.layout == LAYOUTS[name] for r in results)


def test_one_block_jacobian_against_a_dense_one(family):
    name, model, _ = family
    cap = ld.capture(model, PROMPTS[:1].tolist(), exclude=(), streams=("resid",))
    states = cap.resid[1, 0]
    f, z0 = block_map(model, 1, states, -1)
    dense = dense_jacobian(f, z0).double()
    expected = float(torch.linalg.eigvals(dense).abs().max())
    spectrum = jacobian_spectrum(model, states, layer=1, k=4, sigma=False)
    assert spectrum.spectral_radius == pytest.approx(expected, rel=1e-4), name


def test_a_steering_vector_lands_at_its_block(family):
    name, model, _ = family
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    plain = ld.capture(model, PROMPTS[:1].tolist(), exclude=(), streams=("resid",))
    with steering(model, vector, layer=2, alpha=0.5):
        steered = ld.capture(model, PROMPTS[:1].tolist(), exclude=(), streams=("resid",))
    torch.testing.assert_close(steered.resid[:2], plain.resid[:2])  # blocks before it see nothing
    torch.testing.assert_close(steered.resid[2], plain.resid[2] + 0.5 * vector, atol=1e-5, rtol=1e-5)


def test_a_patch_sweep_equals_brute_force_hugging_face_patching(family):
    name, model, reference = family
    clean, edited = PROMPTS[0], PROMPTS[1]
    cap = ld.capture(model, [edited.tolist()], exclude=(), streams=("resid",))
    if LAYOUTS[name] == "post-norm":  # encoders: no next-token logits, refused in one line
        with pytest.raises(ArgumentError, match="an encoder .* has none"):
            patch_sweep(model, clean, cap.resid[:-1, 0], [-1], [-1])
        return
    sweep = patch_sweep(model, clean, cap.resid[:-1, 0], [-1], [-1])
    layers = decoder_layers(reference)
    for block in range(model.cfg.n_layers):
        def replace(module, args, kwargs, block=block):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            hidden[0, -1] = cap.resid[block, 0, -1]
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = layers[block].register_forward_pre_hook(replace, with_kwargs=True)
        try:
            with torch.inference_mode():
                expected = reference(clean[None]).logits[0, -1]
        finally:
            handle.remove()
        torch.testing.assert_close(sweep[block], expected, atol=1e-4, rtol=1e-4, msg=f"{name}: block {block}")


def test_the_block_map_at_its_base_point_is_the_next_state_encoders_included(family):
    """At ``z0`` the map gives the block's real output at that position: an encoder's position 3 depends on the
    positions after it too (a map cut after the target, right for causal models, would be wrong there)."""
    name, model, _ = family
    cap = ld.capture(model, PROMPTS[:1].tolist(), exclude=(), streams=("resid",))
    f, z0 = block_map(model, 1, cap.resid[1, 0], 3)
    torch.testing.assert_close(f(z0), cap.resid[2, 0, 3], atol=1e-5, rtol=1e-5)


def test_block_inputs_are_recorded_once_per_length_and_hold_no_cache(family):
    """One forward pass records every block's inputs; no key/value cache rides along (GPT-2 passes one
    positionally), so a block called twice on the same input gives the same output."""
    from lensdyn.hooks.iterate import block_inputs

    name, model, _ = family
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        recorded = [block_inputs(model, block, 7) for block in range(model.cfg.n_layers)]
        block_inputs(model, 0, 7)
    finally:
        handle.remove()
    assert len(passes) == 1, name
    x = torch.randn(1, 7, model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    args, kwargs = recorded[1]
    with torch.inference_mode():
        first, second = (model.blocks[1](x, *args, **kwargs) for _ in range(2))
    first, second = (out[0] if isinstance(out, tuple) else out for out in (first, second))
    torch.testing.assert_close(first, second)


def test_fused_attention_is_taken_where_it_agrees_and_says_so_where_it_is_not(family, monkeypatch):
    """Every family: the sdpa fast path of long prompts (lensdyn.hooks.fused_attention), shortened to these prompts,
    is either taken and agrees with the reconstruction, or refused with a warning and the capture unchanged."""
    name, model, _ = family
    reference = ld.capture(model, PROMPTS.tolist(), exclude=())
    monkeypatch.setattr(fused_attention, "MIN_TOKENS", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = ld.capture(model, PROMPTS.tolist(), exclude=())
    record = fast_paths(model)[fused_attention.NAME]
    if record.taken:
        for stream in ("resid", "attn_out", "mlp_out"):
            a, b = cap.tokens_of(stream).double(), reference.tokens_of(stream).double()
            assert float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-12)).max()) < 1e-4, (name, stream)
    else:
        assert any(issubclass(w.category, FastPathWarning) for w in caught), name
        torch.testing.assert_close(cap.resid, reference.resid, rtol=0, atol=0)
    if name in ("llama", "qwen2", "qwen3", "mistral", "gpt2"):  # the write-ups' families: the fast path must be there
        assert record.taken, (name, record.reason)
