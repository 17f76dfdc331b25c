"""Every model is self-tested before its first capture: a bridge whose hooks lie is refused, not averaged."""
import pytest
import torch

import lensdyn as ld
from lensdyn.errors import HookSemanticsError
from lensdyn.hooks.selftest import SELF_TEST_TOKENS, ensure_self_tested, self_test


def test_a_sound_bridge_passes_every_check_including_the_hugging_face_layers(tiny_llama):
    report = self_test(tiny_llama, list(range(3, 40)))
    assert report.passed and [c.name for c in report.checks] == [
        "hooks fired", "pre-norm decomposition", "equals the Hugging Face layers"]
    assert all(c.gap < 1e-6 for c in report.checks)
    assert "passed" in report.summary() and "pre-norm" in report.layout


def test_a_hook_that_holds_the_residual_added_state_is_refused_by_name(tiny_llama):
    """The upstream failure: ``hook_attn_out`` pointing at the state after the residual addition."""
    block = tiny_llama.blocks[1]
    block.hook_aliases = {**block.hook_aliases, "hook_attn_out": "ln2.hook_in"}  # a rebind TransformerLens honours
    report = self_test(tiny_llama, list(range(3, 40)))
    failed = [c for c in report.checks if not c.passed]
    assert [c.name for c in failed] == ["pre-norm decomposition"] and "blocks.1" in failed[0].where
    with pytest.raises(HookSemanticsError, match=r"self-test \(pre-norm decomposition at blocks\.1"):
        ld.capture(tiny_llama, [list(range(3, 12))], streams=("resid",))


def test_hidden_states_that_differ_from_the_hugging_face_layer_are_refused(tiny_llama):
    """A bridge whose resid_pre is not what the wrapped layer received (here: a hook shifts it by one)."""
    layer = tiny_llama.blocks[2].original_component
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: ((args[0] + 1.0, *args[1:]), kwargs)
                                             if args else None, with_kwargs=True)
    try:
        report = self_test(tiny_llama, list(range(3, 40)))
    finally:
        handle.remove()
    assert not report.passed
    assert any(c.name in ("equals the Hugging Face layers", "pre-norm decomposition") and not c.passed
               for c in report.checks)


def test_the_self_test_runs_once_per_model_on_a_short_prompt(tiny_llama, monkeypatch):
    calls = []
    real = self_test
    monkeypatch.setattr("lensdyn.hooks.selftest.self_test", lambda model, tokens: calls.append(len(tokens[:SELF_TEST_TOKENS]))
                        or real(model, tokens))
    long = [list(range(3, 60))]
    ld.capture(tiny_llama, long, streams=("resid",))
    ld.capture(tiny_llama, long, streams=("resid",))
    assert calls == [SELF_TEST_TOKENS]
    assert ensure_self_tested(tiny_llama, long[0]).passed


def test_a_tl_native_model_passes_against_the_modules_its_blocks_wrap(tiny_model):
    report = self_test(tiny_model, [1, 2, 3, 4])
    assert report.passed and [c.name for c in report.checks][:2] == ["hooks fired", "pre-norm decomposition"]
    with torch.inference_mode():
        assert ld.capture(tiny_model, [[1, 2, 3, 4]], streams=("resid",)).packed["resid"].isfinite().all()
