"""Fused attention (sdpa) for long prompts: taken where it agrees with the reconstruction, loud where it does not."""
import warnings

import pytest
import torch

import lensdyn as ld
from lensdyn.fastpath import FastPathWarning, fast_paths
from lensdyn.hooks import fused_attention

STREAMS = ("resid", "attn_out", "mlp_out")
PROMPTS = [list(range(3, 40)), list(range(50, 71))]  # two rows of other lengths: the padding mask is exercised


def token_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token error relative to that token's norm."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-12)).max())


def test_a_long_batch_is_fused_and_agrees_with_the_reconstruction(tiny_llama, monkeypatch):
    reference = ld.capture(tiny_llama, PROMPTS, streams=STREAMS)  # 37 positions < MIN_TOKENS: reconstructed
    assert fused_attention.NAME not in fast_paths(tiny_llama)
    monkeypatch.setattr(fused_attention, "MIN_TOKENS", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        fused = ld.capture(tiny_llama, PROMPTS, streams=STREAMS)
    record = fast_paths(tiny_llama)[fused_attention.NAME]
    assert record.taken and record.disagreement < 1e-5
    for stream in STREAMS:
        assert token_gap(fused.tokens_of(stream), reference.tokens_of(stream)) < 1e-5, stream
    # Restored afterwards: the class's forward and the eager masks again.
    assert all("forward" not in vars(b) for b in fused_attention.attention_bridges(tiny_llama))
    assert tiny_llama.original_model.config._attn_implementation == "eager"


def test_attention_patterns_and_callers_hooks_are_never_fused(tiny_llama, monkeypatch):
    monkeypatch.setattr(fused_attention, "MIN_TOKENS", 1)
    cap = ld.capture(tiny_llama, PROMPTS, streams=("resid",), attention=True)
    assert cap.attention is not None and fused_attention.NAME not in fast_paths(tiny_llama)
    assert not fused_attention.use_fused_attention(tiny_llama, 10_000, needs_attention_hooks=True)
    seen = []
    with tiny_llama.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda pattern, hook: seen.append(1))]):
        assert not fused_attention.use_fused_attention(tiny_llama, 10_000, needs_attention_hooks=False)
        ld.capture(tiny_llama, PROMPTS, streams=("resid",))
    assert seen and fused_attention.NAME not in fast_paths(tiny_llama)  # the caller's hook fired: not fused
    assert fused_attention.use_fused_attention(tiny_llama, 10_000, needs_attention_hooks=False)


def test_a_fused_path_that_disagrees_warns_once_and_the_capture_is_the_reconstruction(tiny_llama, monkeypatch):
    reference = ld.capture(tiny_llama, PROMPTS, streams=STREAMS)
    real = fused_attention._fused_forward

    def off_by_a_percent(bridge):
        forward = real(bridge)
        return lambda *args, **kwargs: (lambda out: (out[0] * 1.01, out[1]))(forward(*args, **kwargs))

    monkeypatch.setattr(fused_attention, "_fused_forward", off_by_a_percent)
    monkeypatch.setattr(fused_attention, "MIN_TOKENS", 16)
    with pytest.warns(FastPathWarning, match="fused attention"):
        cap = ld.capture(tiny_llama, PROMPTS, streams=STREAMS)
    assert fast_paths(tiny_llama)[fused_attention.NAME].taken is False
    for stream in STREAMS:
        torch.testing.assert_close(cap.tokens_of(stream), reference.tokens_of(stream), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)  # once: the verdict stays with the model
        ld.capture(tiny_llama, PROMPTS, streams=STREAMS)
