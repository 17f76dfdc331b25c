"""Gains: a synthetic stream with known sublayer outputs, phases, the scaling fit, then smollm2 against HF modules."""
import dataclasses

import numpy as np
import pytest
import torch

import lensdyn as ld
from conftest import synthetic_capture
from lensdyn.analyses import gains
from lensdyn.errors import ArgumentError
from lensdyn.ops import masked_tokens


def known_stream(n_blocks=4, n_prompts=2, n_pos=5, d=6):
    """Every token's input has norm 2; attention writes c_l times its input, the MLP 10 c_l, so gains are known."""
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(n_blocks, n_prompts, n_pos, d, generator=g), dim=-1)
    attn_in = 2.0 * directions
    mlp_in = 2.0 * directions.flip(-1)
    c = torch.tensor([0.5, 1.5, 0.25, 3.0])[:, None, None, None]
    resid = torch.ones(n_blocks + 1, n_prompts, n_pos, d) * torch.arange(1, n_blocks + 2).float()[:, None, None, None]
    return dict(
        resid=resid, resid_mid=resid[:-1] * 2.0, attn_in=attn_in, attn_out=c * attn_in, mlp_in=mlp_in, mlp_out=10 * c * mlp_in
    )


def test_known_sublayer_outputs_give_exact_gains_under_each_reference():
    streams = known_stream()
    cap = synthetic_capture(torch.ones(2, 5, dtype=torch.bool), **streams)
    result = gains.measure(cap, control=None)
    np.testing.assert_allclose(result.attn_gain, [0.5, 1.5, 0.25, 3.0], rtol=1e-6)
    np.testing.assert_allclose(result.mlp_gain, [5.0, 15.0, 2.5, 30.0], rtol=1e-6)
    np.testing.assert_allclose(result.resid_gain, [2.0, 1.5, 4 / 3, 1.25], rtol=1e-6)  # resid norm grows as l + 1
    assert (result.attn_contracting, result.attn_expanding) == (2, 2)
    assert (result.mlp_contracting, result.mlp_argmax, result.last_mlp_gain) == (0, 3, pytest.approx(30.0))
    resid_ref = gains.measure(cap, control=None, reference="resid")
    sqrt_d = np.sqrt(6)
    attn_out_norm = np.array([0.5, 1.5, 0.25, 3.0]) * 2.0
    np.testing.assert_allclose(resid_ref.attn_gain, attn_out_norm / (np.arange(1, 5) * sqrt_d), rtol=1e-6)
    np.testing.assert_allclose(resid_ref.mlp_gain, 10 * attn_out_norm / (2 * np.arange(1, 5) * sqrt_d), rtol=1e-6)


def test_ratio_of_means_mean_of_ratios_and_last_token_differ_as_computed_by_hand():
    token_mask = torch.tensor([[True, True, True, False]])
    out = torch.zeros(1, 1, 4, 2)
    ref = torch.zeros(1, 1, 4, 2)
    out[0, 0, :3, 0] = torch.tensor([9.0, 1.0, 4.0])
    ref[0, 0, :3, 0] = torch.tensor([9.0, 2.0, 1.0])
    mask = token_mask.clone()
    mask[0, 0] = False
    out_tokens, ref_tokens = masked_tokens(out, mask), masked_tokens(ref, mask)
    assert gains.sublayer_gain(out_tokens, ref_tokens)[0] == pytest.approx(5 / 3)
    assert gains.sublayer_gain(out_tokens, ref_tokens, "mean_of_ratios")[0] == pytest.approx((0.5 + 4) / 2)
    streams = dict(resid=torch.cat([ref, ref]), resid_mid=ref, attn_in=ref, attn_out=out, mlp_in=ref, mlp_out=out)
    last = gains.measure(synthetic_capture(token_mask, **streams), control=None, tokens="last")
    assert last.attn_gain[0] == pytest.approx(4.0)  # position 2 is the last real token


def test_phases_follow_the_change_point_rule():
    profile = np.array([2.0, 2.1, 1.9, 2.0, 1.0, 1.02, 0.98, 1.0, 1.01, 0.5, 0.52, 0.49, 0.5, 6.24])
    phases = gains.gain_phases(profile)
    assert [(p.start, p.end, p.label) for p in phases] == [
        (0, 3, "expanding"), (4, 8, "neutral"), (9, 12, "contracting"), (13, 13, "final expanding"),
    ]
    assert phases[-1].gain == pytest.approx(6.24)


def _result_with(result, model, n_params, last_gain):
    mlp = result.mlp_gain.copy()
    mlp[-1] = last_gain
    return dataclasses.replace(
        result, mlp_gain=mlp, last_mlp_gain=last_gain,
        provenance=dataclasses.replace(result.provenance, model=model, n_params=n_params),
    )


def test_scaling_recovers_a_planted_exponent_and_refuses_two_points():
    base = gains.measure(synthetic_capture(torch.ones(2, 5, dtype=torch.bool), **known_stream()), control=None)
    sizes = [1.4e9, 6.9e9, 12e9]
    results = [_result_with(base, f"m{i}", int(p), 2.0 * p**0.35) for i, p in enumerate(sizes)]
    fit = gains.scaling(results)
    assert fit.exponent == pytest.approx(0.35, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert "0.35" in fit.summary() and fit.figure() is not None
    with pytest.raises(ArgumentError, match="two points always give an exponent"):
        gains.scaling(results[:2])
    with pytest.raises(ArgumentError, match="at least 3 models of different sizes"):
        gains.scaling([results[0]] * 3)
    other = dataclasses.replace(results[2], reference="resid")
    with pytest.raises(ArgumentError, match="reference"):
        gains.scaling(results[:2] + [other])


def test_bad_options_fail_clearly():
    cap = synthetic_capture(torch.ones(2, 5, dtype=torch.bool), **known_stream())
    with pytest.raises(ArgumentError, match="reference must be one of"):
        gains.measure(cap, control=None, reference="layernorm")
    with pytest.raises(ArgumentError, match="holds no 'resid_mid', 'attn_in', 'attn_out', 'mlp_in', 'mlp_out'"):
        gains.measure(synthetic_capture(torch.ones(2, 5, dtype=torch.bool), resid=torch.ones(3, 2, 5, 4)), control=None)


def test_tiny_model_gains_equal_a_brute_force_loop_over_hooks(tiny_model):
    """Independent path: run_with_cache per prompt, norms of the named hooks, averaged by hand."""
    ids = torch.randint(0, 50, (3, 9))
    result = gains.measure(ld.capture(tiny_model, ids, streams=gains.STREAMS), control=None)
    attn, ln1 = np.zeros(3), np.zeros(3)
    with torch.inference_mode():
        for i in range(3):
            _, cache = tiny_model.run_with_cache(ids[i : i + 1])
            for l in range(3):
                attn[l] += cache[f"blocks.{l}.hook_attn_out"][0, 1:].double().norm(dim=-1).sum().item()
                ln1[l] += cache[f"blocks.{l}.ln1.hook_out"][0, 1:].double().norm(dim=-1).sum().item()
    np.testing.assert_allclose(result.attn_gain, attn / ln1, rtol=1e-5)


def test_round_trip_through_json(tmp_path):
    cap = synthetic_capture(torch.ones(2, 5, dtype=torch.bool), **known_stream())
    result = gains.measure(cap, control=gains.measure(cap, control=None))
    loaded = ld.load_result(result.to_json(tmp_path / "gains.json"))
    assert isinstance(loaded.mlp_phases[0], gains.Phase)
    for name in ("attn_gain", "mlp_gain", "resid_gain", "mlp_phases"):
        assert name in result.to_dict()


@pytest.mark.slow
def test_smollm2_gains_match_hugging_face_module_outputs(smollm2_diverse, smollm2_reference):
    """Independent path: forward hooks on HF's own norm, attention and MLP modules, prompt by prompt."""
    result = gains.measure(smollm2_diverse, control=None)
    layers = smollm2_reference.model.layers
    n = len(layers)
    sums = {k: np.zeros(n) for k in ("ln1", "attn", "ln2", "mlp")}
    handles = []
    for l, layer in enumerate(layers):
        for key, module in (("ln1", layer.input_layernorm), ("attn", layer.self_attn),
                            ("ln2", layer.post_attention_layernorm), ("mlp", layer.mlp)):
            def hook(m, i, o, key=key, l=l):
                out = o[0] if isinstance(o, tuple) else o
                sums[key][l] += out[0, 1:].double().norm(dim=-1).sum().item()
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for i in range(smollm2_diverse.n_prompts):
                smollm2_reference(smollm2_diverse.tokens[i][smollm2_diverse.token_mask[i]][None])
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(result.attn_gain, sums["attn"] / sums["ln1"], rtol=1e-4)
    np.testing.assert_allclose(result.mlp_gain, sums["mlp"] / sums["ln2"], rtol=1e-4)


@pytest.mark.slow
def test_control_random_runs_the_untrained_twin_on_the_same_tokens(minilm):
    texts = ["The river rose to the fourth step of the old mill.", "Snow fell on the quiet village all night long."]
    result = gains.measure(minilm, texts, exclude=("special",))
    assert result.control.provenance.weights == "random" and result.provenance.weights == "pretrained"
    assert result.control.provenance.n_tokens == result.provenance.n_tokens
    assert not np.allclose(result.control.attn_gain, result.attn_gain)
    with pytest.raises(ArgumentError, match="needs model="):
        gains.measure(ld.capture(minilm, texts, streams=gains.STREAMS))
